"""clipmill.recaption: VLM dense captions and LLM prompt expansion (not built yet; see the recaption issue)."""
