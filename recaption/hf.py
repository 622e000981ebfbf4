"""In-process transformers backend: AutoProcessor + AutoModelForImageTextToText (vision-language models) or
AutoTokenizer + AutoModelForCausalLM (text-only LLMs), chat templates, batched greedy or sampled generation.

The model loads once per backend instance from a local directory or a hub id (`from_pretrained`; safetensors
preferred, `trust_remote_code` off unless asked). On CUDA it runs in bfloat16 by default, on CPU in float32.
Prompts are padded on the left so a batch generates exactly what its requests would generate one by one (up to
floating-point differences of padded matrix shapes). A batch that fails (out of memory, a prompt longer than
the model's context) is retried request by request, so only the offending request gets an error.

Imports torch/transformers when constructed, and nothing of clipmill beyond `textgen` (GPU scripts can use it
after `pip install --no-deps -e .`).
"""

from __future__ import annotations

import logging
from typing import Any

from clipmill.recaption.textgen import GenRequest, GenResult, TextBackend, clean_reply, one_line, resize_frame

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")


def pick_device(device: str = "auto") -> str:
    """"cuda" when asked or (for "auto") when a GPU is visible, else "cpu"."""
    import torch  # noqa: PLC0415

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device: auto or cpu")
    return device


class ContextOverflow(ValueError):
    """A prompt plus max_new_tokens does not fit the model's context window."""


def context_length(config: Any) -> int | None:
    """The model's context window (max_position_embeddings of its text config), or None when unknown."""
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


class TransformersBackend(TextBackend):
    """Generate with a transformers model in this process (see the module docstring).

    Args:
        model: local directory or hub id.
        vision: load an image-text-to-text model and its processor (captions); else a causal LM + tokenizer.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU) or an explicit torch dtype name.
        trust_remote_code: allow the checkpoint's own Python code (off by default).
        revision: hub revision (branch, tag or commit).
        max_new_tokens, temperature: generation length and sampling (0 = greedy).
        batch_size: requests per `generate` call.
        image_side: frames are scaled so their longer side is at most this before the processor sees them.
        threads: torch intra-op threads when running on CPU (None = leave torch's setting). Process-wide.
    """

    def __init__(self, model: str, *, vision: bool, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, revision: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, batch_size: int = 8, image_side: int | None = None,
                 threads: int | None = None) -> None:
        import torch  # noqa: PLC0415
        import transformers as tf  # noqa: PLC0415

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.device = pick_device(device)
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = getattr(torch, dtype)
        self.vision = vision
        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = max(1, batch_size)
        self.image_side = image_side
        kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
        if vision:
            self.processor = tf.AutoProcessor.from_pretrained(model, **kw)
            self.tokenizer = self.processor.tokenizer
            self.model = tf.AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype, **kw)
        else:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(model, **kw)
            self.processor = None
            self.model = tf.AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, **kw)
        self.model.to(self.device).eval()
        self.context = context_length(self.model.config)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        templ = self.processor if vision else self.tokenizer
        if not getattr(templ, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model} has no chat template; use an instruct/chat checkpoint (or one whose "
                             f"tokenizer_config.json or chat_template.jinja defines it)")
        log.info("transformers backend: %s (%s) on %s as %s", model, type(self.model).__name__, self.device,
                 self.dtype)

    # ------------------------------------------------------------------------------------------ prompts

    def _messages(self, req: GenRequest) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        if self.vision:
            if req.system:
                msgs.append({"role": "system", "content": [{"type": "text", "text": req.system}]})
            content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
            msgs.append({"role": "user", "content": content})
        else:
            if req.system:
                msgs.append({"role": "system", "content": req.system})
            msgs.append({"role": "user", "content": req.prompt})
        return msgs

    def _inputs(self, reqs: list[GenRequest]) -> Any:
        templ = self.processor if self.vision else self.tokenizer
        texts = [templ.apply_chat_template(self._messages(r), add_generation_prompt=True, tokenize=False)
                 for r in reqs]
        if self.vision and any(r.images for r in reqs):
            from PIL import Image  # noqa: PLC0415

            images = [[Image.fromarray(resize_frame(f, self.image_side)) for f in r.images] for r in reqs]
            enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        elif self.vision:
            enc = self.processor(text=texts, return_tensors="pt", padding=True)
        else:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.to(self.device)

    # ------------------------------------------------------------------------------------------ generation

    def _generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        import torch  # noqa: PLC0415

        enc = self._inputs(reqs)
        if self.context is not None:
            longest = int(enc["attention_mask"].sum(1).max())
            if longest + self.max_new_tokens > self.context:
                raise ContextOverflow(f"prompt of {longest} tokens + max_new_tokens {self.max_new_tokens} exceeds "
                                      f"the model's context of {self.context} tokens")
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                              "pad_token_id": self.tokenizer.pad_token_id}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        results = []
        stop = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in stop), len(row))
            text = clean_reply(self.tokenizer.decode(row[:n], skip_special_tokens=True))
            results.append(GenResult(text=text, tokens=n) if text
                           else GenResult(error="malformed reply: the model generated no text", tokens=n))
        return results

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult] = []
        for s in range(0, len(requests), self.batch_size):
            chunk = requests[s:s + self.batch_size]
            try:
                out.extend(self._generate_batch(chunk))
                continue
            except Exception as exc:  # noqa: BLE001 - retried one by one below, where failures become data
                if len(chunk) == 1:
                    out.append(GenResult(error=_describe(exc)))
                    continue
                log.warning("transformers: batch of %d failed (%s); retrying one by one", len(chunk), one_line(exc))
            for req in chunk:
                try:
                    out.extend(self._generate_batch([req]))
                except Exception as exc:  # noqa: BLE001 - one request's failure is its error
                    out.append(GenResult(error=_describe(exc)))
        return out

    def close(self) -> None:
        import torch  # noqa: PLC0415

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ContextOverflow):
        return f"context overflow: {one_line(exc)}"
    msg = one_line(f"{type(exc).__name__}: {exc}")
    low = msg.lower()
    if "out of memory" in low:
        return f"out of memory: {msg}"
    if "sequence length" in low or "context" in low or "max_position" in low or "index out of range" in low:
        return f"context overflow: {msg}"
    return f"generation failed: {msg}"
