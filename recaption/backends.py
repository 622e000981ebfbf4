"""Build the backend a GenerationConfig names, once per process (models load once per worker)."""

from __future__ import annotations

import threading

from clipmill.recaption.config import GenerationConfig
from clipmill.recaption.textgen import TextBackend

_CACHE: dict[tuple[str, bool, int | None], TextBackend] = {}
_LOCK = threading.Lock()


def make_backend(cfg: GenerationConfig, *, vision: bool, max_images: int | None = None,
                 image_side: int | None = None) -> TextBackend:
    """A new backend for `cfg` ("transformers", "vllm" or "openai"); ValueError for a built-in backend.

    `vision` picks a vision-language model (captions) over a text-only LLM (prompts) for in-process backends.
    """
    if cfg.backend == "transformers":
        from clipmill.recaption.hf import TransformersBackend  # noqa: PLC0415

        return TransformersBackend(cfg.model or "", vision=vision, device=cfg.device, dtype=cfg.dtype,
                                   trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   batch_size=cfg.batch_size, image_side=image_side, threads=cfg.threads)
    if cfg.backend == "vllm":
        from clipmill.recaption.vllm_backend import VllmBackend  # noqa: PLC0415

        return VllmBackend(cfg.model or "", max_images=max_images if vision else 0, dtype=cfg.dtype,
                           trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                           max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                           tensor_parallel_size=cfg.tensor_parallel_size, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature)
    if cfg.backend == "openai":
        from clipmill.recaption.openai_http import OpenAIBackend  # noqa: PLC0415

        return OpenAIBackend(cfg.base_url or "", cfg.model or "", api_key_env=cfg.api_key_env,
                             timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                             concurrency=cfg.concurrency, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature)
    raise ValueError(f"backend {cfg.backend!r} is built in and has no model")


def get_backend(cfg: GenerationConfig, *, vision: bool, max_images: int | None = None,
                image_side: int | None = None) -> TextBackend:
    """The process-wide backend for `cfg` (built on first use, then reused)."""
    key = (cfg.backend_key() + f"|{image_side}", vision, max_images)
    with _LOCK:
        be = _CACHE.get(key)
        if be is None:
            be = make_backend(cfg, vision=vision, max_images=max_images, image_side=image_side)
            _CACHE[key] = be
        return be


def clear_backends() -> None:
    """Close and forget every cached backend (tests, or to free GPU memory)."""
    with _LOCK:
        for be in _CACHE.values():
            be.close()
        _CACHE.clear()
