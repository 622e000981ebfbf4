"""clipmill.dit: the bundled spacetime Diffusion Transformer trainer and sampler (not built yet; see its issue)."""
