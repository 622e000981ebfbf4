"""In-process vLLM backend (GPU): one `vllm.LLM` per process, multi-image chat requests, batched by vLLM.

vLLM is imported only when this backend is built (it is not a clipmill dependency: `pip install vllm` on a
GPU machine). Requests go through `LLM.chat` with the same OpenAI-style messages the HTTP backend sends
(frames as base64 JPEG data URLs), so a recipe can move between a vLLM server and in-process vLLM without
changing prompts. `limit_mm_per_prompt` is set from the largest number of frames a request may carry.
A request vLLM rejects (e.g. longer than `max_model_len`) is retried alone so only it gets the error.
"""

from __future__ import annotations

import logging
from typing import Any

from clipmill.recaption.textgen import (
    GenRequest,
    GenResult,
    TextBackend,
    clean_reply,
    one_line,
    openai_messages,
)

log = logging.getLogger(__name__)


def vllm_available() -> tuple[bool, str]:
    """(True, "") when vLLM can be imported and a CUDA GPU is visible, else (False, why)."""
    try:
        import vllm  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"vllm is not importable ({type(exc).__name__}: {one_line(exc, 120)})"
    try:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
    except ImportError:
        return False, "torch is not installed"
    return True, ""


class VllmBackend(TextBackend):
    """Generate with vLLM in this process (see the module docstring).

    Args:
        model: hub id or local directory.
        max_images: most frames any request carries (vLLM's limit_mm_per_prompt).
        dtype: "auto" (vLLM's choice: bfloat16 for most checkpoints), "bfloat16", "float16" or "float32".
        trust_remote_code, revision, max_model_len, gpu_memory_utilization, tensor_parallel_size: passed to
            vllm.LLM.
        max_new_tokens, temperature: sampling parameters.
    """

    def __init__(self, model: str, *, max_images: int = 8, dtype: str = "auto", trust_remote_code: bool = False,
                 revision: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, max_new_tokens: int = 256,
                 temperature: float = 0.0, seed: int = 0) -> None:
        try:
            from vllm import LLM, SamplingParams  # noqa: PLC0415
        except ImportError as exc:
            raise ImportError("backend 'vllm' needs vLLM on a CUDA machine: pip install vllm "
                              "(or serve the model with `vllm serve` and use backend 'openai')") from exc
        kw: dict[str, Any] = {"model": model, "dtype": dtype, "trust_remote_code": trust_remote_code,
                              "gpu_memory_utilization": gpu_memory_utilization,
                              "tensor_parallel_size": tensor_parallel_size, "seed": seed}
        if revision:
            kw["revision"] = revision
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if max_images:
            kw["limit_mm_per_prompt"] = {"image": max_images}
        self.llm = LLM(**kw)
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.model_name = model

    def _run(self, reqs: list[GenRequest]) -> list[GenResult]:
        convs = [openai_messages(r) for r in reqs]
        outs = self.llm.chat(convs, self.params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            text = clean_reply(c.text)
            results.append(GenResult(text=text, tokens=len(c.token_ids)) if text
                           else GenResult(error="malformed reply: the model generated no text"))
        return results

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        try:
            return self._run(requests)
        except Exception as exc:  # noqa: BLE001 - retried one by one, failures become data
            if len(requests) == 1:
                return [GenResult(error=f"generation failed: {one_line(exc)}")]
            log.warning("vllm: batch of %d failed (%s); retrying one by one", len(requests), one_line(exc))
        out = []
        for r in requests:
            try:
                out.extend(self._run([r]))
            except Exception as exc:  # noqa: BLE001
                msg = one_line(exc)
                kind = "context overflow" if "longer than" in msg or "max_model_len" in msg else "generation failed"
                out.append(GenResult(error=f"{kind}: {msg}"))
        return out
