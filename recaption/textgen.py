"""The text-generation interface every backend implements, and the helpers they share.

A request is a system prompt, a user prompt and optionally images (RGB uint8 frames, in order); a result is
the generated text or an error string, never an exception: one failed request (timeout, server error,
malformed reply, context overflow) must not fail its neighbours in a batch. Backends: `hf.py` (in-process
transformers), `vllm_backend.py` (in-process vLLM), `openai_http.py` (any OpenAI-compatible server).

Imports only the standard library and numpy (plus Pillow inside `jpeg_data_url`), so GPU scripts can use
it without clipmill's other dependencies.
"""

from __future__ import annotations

import base64
import io
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class GenRequest:
    """One generation: `prompt` (user text), optional `system` text and `images` (RGB uint8 arrays, in order)."""

    prompt: str
    system: str | None = None
    images: list[np.ndarray] = field(default_factory=list)


@dataclass
class GenResult:
    """What came back for one request: `text` (cleaned) or `error` (one line), and generated-token count."""

    text: str | None = None
    error: str | None = None
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text)


class TextBackend(ABC):
    """A text generator: `generate(requests)` returns one GenResult per request, in order.

    `model_name` is what the dataset records (`caption_model`, `prompt_model`). Implementations batch
    internally as they see fit and turn per-request failures into `GenResult.error`; they raise only when
    the backend cannot work at all (e.g. a model that cannot be loaded).
    """

    model_name: str = ""

    @abstractmethod
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Generate one reply per request."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, GPU memory); the default does nothing."""


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)


def clean_reply(text: str | None) -> str:
    """Generated text as stored: reasoning blocks (<think>...</think>) removed, whitespace collapsed."""
    if not text:
        return ""
    text = _THINK.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def one_line(msg: Any, limit: int = 300) -> str:
    """An error message on one line, at most `limit` characters."""
    text = re.sub(r"\s+", " ", str(msg)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resize_frame(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    """RGB frame scaled (area interpolation) so its longer side is at most `max_side` (never upscaled)."""
    if not max_side or max(frame.shape[:2]) <= max_side:
        return frame
    from PIL import Image  # noqa: PLC0415

    h, w = frame.shape[:2]
    s = max_side / max(h, w)
    img = Image.fromarray(np.ascontiguousarray(frame)).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                              Image.BOX)
    return np.asarray(img)


def jpeg_data_url(frame: np.ndarray, quality: int = 90) -> str:
    """A `data:image/jpeg;base64,...` URL of an RGB uint8 frame (how OpenAI-style APIs take images)."""
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_url(url: str) -> np.ndarray:
    """RGB uint8 array of a base64 `data:image/...` URL; ValueError for anything else."""
    from PIL import Image  # noqa: PLC0415

    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or ";base64" not in head:
        raise ValueError("only base64 data:image URLs are accepted")
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    return np.asarray(img.convert("RGB"))


def openai_messages(req: GenRequest, *, image_quality: int = 90) -> list[dict[str, Any]]:
    """Chat messages in the OpenAI format: system text, then user content (images first, then the text)."""
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": req.system})
    if req.images:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": jpeg_data_url(f, image_quality)}} for f in req.images]
        content.append({"type": "text", "text": req.prompt})
        msgs.append({"role": "user", "content": content})
    else:
        msgs.append({"role": "user", "content": req.prompt})
    return msgs
