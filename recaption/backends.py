"""Build the backend a GenerationConfig names, once per process (models load once per worker)."""

from __future__ import annotations

import threading

from clipmill.recaption.config import GenerationConfig
from clipmill.recaption.textgen import TextBackend

_CACHE: dict[tuple[str, bool, int | None], TextBackend] = {}
_FAILED: dict[tuple[str, bool, int | None], str] = {}
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


class BackendUnavailable(RuntimeError):
    """The backend could not be built (model not found, package missing, key not set); not retried in-process."""


def get_backend(cfg: GenerationConfig, *, vision: bool, max_images: int | None = None,
                image_side: int | None = None) -> TextBackend:
    """The process-wide backend for `cfg` (built on first use, then reused).

    A backend that fails to build raises BackendUnavailable, and keeps raising it in this process without trying
    again (a model that cannot be found is not found again for every batch).
    """
    key = (cfg.backend_key() + f"|{image_side}", vision, max_images)
    with _LOCK:
        if key in _FAILED:
            raise BackendUnavailable(_FAILED[key])
        be = _CACHE.get(key)
        if be is None:
            try:
                be = make_backend(cfg, vision=vision, max_images=max_images, image_side=image_side)
            except Exception as exc:  # noqa: BLE001 - any load failure: remembered, reported as one line
                msg = f"{cfg.backend} backend for {cfg.model!r} could not be built: {type(exc).__name__}: {exc}"
                _FAILED[key] = " ".join(msg.split())[:400]
                raise BackendUnavailable(_FAILED[key]) from exc
            _CACHE[key] = be
        return be


def clear_backends() -> None:
    """Close and forget every cached backend (tests, or to free GPU memory)."""
    with _LOCK:
        for be in _CACHE.values():
            be.close()
        _CACHE.clear()
        _FAILED.clear()
