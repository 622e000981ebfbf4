"""Captioning and prompt expansion as plain functions (the stages, `clipmill caption` and the sampler call these).

* `caption_clips(clips, settings)`: a dense caption per clip (row + decoded frames), from a VLM backend or,
  offline, the metadata writer (`caption_model = "clipmill/metadata"`).
* `expand_clips(rows, settings)`: a short and a long training prompt per captioned clip, from an LLM backend
  or, offline, the template writer (`prompt_model = "clipmill/template"`).
* `expand_prompt(text, config=None)`: a user's short prompt expanded into the kind of dense caption the
  model was trained on (the DiT sampler calls this); offline template unless `config` names an LLM.

A failed generation is returned as an error string, never raised.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from clipmill.recaption.config import GenerationConfig
from clipmill.recaption.facts import METADATA_MODEL, ClipFacts, clip_facts, describe, metadata_caption
from clipmill.recaption.prompts import (
    CAPTION_SYSTEM,
    EXPAND_SYSTEM,
    caption_prompt,
    expand_request,
    parse_expansion,
)
from clipmill.recaption.textgen import GenRequest, one_line, resize_frame

log = logging.getLogger(__name__)

TEMPLATE_MODEL = "clipmill/template"


class CaptionSettings(GenerationConfig):
    """Caption settings: a GenerationConfig whose built-in backend is "metadata", plus frame choices.

    Args:
        max_frames: send at most this many of the clip's caption frames (evenly spread, first and last kept).
        image_side: scale frames so their longer side is at most this before the model sees them (None = as
            decoded; the caption frame set is decoded at 448 px).
    """

    backend: Literal["metadata", "transformers", "vllm", "openai"] = "metadata"
    max_frames: int = Field(8, ge=1, le=64)
    image_side: int | None = Field(None, ge=28, le=4096)


class ExpandSettings(GenerationConfig):
    """Expansion settings: a GenerationConfig whose built-in backend is "template".

    Args:
        duration_s, aspect: what the template expansion of a user prompt says about the shot to sample
            (the training captions state both; see `facts.describe`).
    """

    backend: Literal["template", "transformers", "vllm", "openai"] = "template"
    max_new_tokens: int = Field(320, ge=1, le=32768)
    duration_s: float = Field(4.0, gt=0, le=3600)
    aspect: str = "16:9"


@dataclass
class CaptionResult:
    """One clip's caption (or error), the model that wrote it, and the dominant colours measured."""

    caption: str | None
    model: str
    error: str | None = None
    colours: list[str] = field(default_factory=list)
    tokens: int = 0


@dataclass
class ExpandedPrompt:
    """A short prompt, a long descriptive prompt, the model that wrote them, and an error when it failed.

    `short`/`long` are None only for a failed clip expansion; `expand_prompt` always fills them (falling back
    to the template, with `error` saying why).
    """

    short: str | None
    long: str | None
    model: str
    error: str | None = None
    tokens: int = 0


def load_backend(settings: CaptionSettings | ExpandSettings) -> None:
    """Build (and cache in this process) the backend `settings` name, so the first batch does not pay for it.

    Does nothing for the built-in writers. A backend that cannot be built is remembered as unavailable
    (see backends.get_backend) and reported per clip when clips arrive; this function never raises for it.
    """
    from clipmill.recaption.backends import BackendUnavailable  # noqa: PLC0415

    if settings.builtin:
        return
    try:
        if isinstance(settings, CaptionSettings):
            _vision_backend(settings)
        else:
            _text_backend(settings)
    except BackendUnavailable as exc:
        log.warning("%s", exc)


def _vision_backend(s: CaptionSettings) -> Any:
    from clipmill.recaption.backends import get_backend  # noqa: PLC0415

    return get_backend(s, vision=True, max_images=s.max_frames, image_side=s.image_side)


def _text_backend(s: GenerationConfig) -> Any:
    from clipmill.recaption.backends import get_backend  # noqa: PLC0415

    return get_backend(s, vision=False)


def pick(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """At most `n` of `frames`, evenly spread, first and last kept (one: the middle one)."""
    if n >= len(frames):
        return list(frames)
    if n == 1:
        return [frames[len(frames) // 2]]
    idx = sorted({int(round(x)) for x in np.linspace(0, len(frames) - 1, n)})
    return [frames[i] for i in idx]


def caption_clips(clips: list[tuple[dict[str, Any], list[np.ndarray]]], settings: CaptionSettings | None = None
                  ) -> list[CaptionResult]:
    """Caption clips given as (row, RGB frames) pairs; one CaptionResult per clip, in order."""
    s = settings or CaptionSettings()
    facts = [clip_facts(row, frames) for row, frames in clips]
    if s.builtin:
        return [CaptionResult(metadata_caption(f), METADATA_MODEL, None, f.colours) for f in facts]
    backend = _vision_backend(s)
    reqs = []
    for (_, frames), f in zip(clips, facts, strict=True):
        picked = [resize_frame(f, s.image_side) for f in pick(frames, s.max_frames)]
        reqs.append(GenRequest(prompt=caption_prompt(f, len(picked)), system=s.system_prompt or CAPTION_SYSTEM,
                               images=picked))
    out = []
    for f, res in zip(facts, backend.generate(reqs), strict=True):
        if res.ok:
            out.append(CaptionResult(res.text, backend.model_name, None, f.colours, res.tokens))
        else:
            out.append(CaptionResult(None, backend.model_name, res.error or "empty reply", f.colours, res.tokens))
    return out


def _words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]).rstrip(",;:") if len(words) > n else text


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (m.group(1) if m else text.strip()).rstrip(".!?")


def template_expansion(caption: str, facts: ClipFacts) -> tuple[str, str]:
    """(short, long) without a model: the short prompt is the caption's subject (or, for a caption without one,
    the camera and colours), at most 15 words; the long prompt is the caption itself."""
    subject = _first_sentence(caption)
    if subject.lower() in ("a video clip", ""):
        bits = []
        if facts.camera_motion:
            bits.append(facts.camera_motion.replace("_", " ") + " shot")
        if facts.colours:
            bits.append("in " + " and ".join(facts.colours[:2]))
        subject = " ".join(bits) or "a video clip"
    short = _words(subject, 15)
    return short[0].lower() + short[1:] if short[:2] != short[:2].upper() else short, caption


def expand_clips(rows: list[dict[str, Any]], settings: ExpandSettings | None = None) -> list[ExpandedPrompt | None]:
    """Training prompts for captioned rows (None for a row without a caption), in order."""
    s = settings or ExpandSettings()
    facts = [clip_facts(r) for r in rows]
    todo = [i for i, r in enumerate(rows) if r.get("caption")]
    out: list[ExpandedPrompt | None] = [None] * len(rows)
    if s.builtin:
        for i in todo:
            short, long = template_expansion(rows[i]["caption"], facts[i])
            out[i] = ExpandedPrompt(short, long, TEMPLATE_MODEL)
        return out
    backend = _text_backend(s)
    reqs = [GenRequest(prompt=expand_request(rows[i]["caption"], facts[i]), system=s.system_prompt or EXPAND_SYSTEM)
            for i in todo]
    for i, res in zip(todo, backend.generate(reqs), strict=True):
        if not res.ok:
            out[i] = ExpandedPrompt(None, None, backend.model_name, res.error or "empty reply", res.tokens)
            continue
        try:
            short, long = parse_expansion(res.text or "")
            out[i] = ExpandedPrompt(short, long, backend.model_name, None, res.tokens)
        except ValueError as exc:
            out[i] = ExpandedPrompt(None, None, backend.model_name, one_line(exc), res.tokens)
    return out


def expand_prompt(text: str, config: ExpandSettings | GenerationConfig | dict | None = None) -> ExpandedPrompt:
    """Expand a user's prompt into a short and a long (dense, caption-like) prompt.

    `config` None (or backend "template") writes the template expansion offline (`model` =
    "clipmill/template"); an LLM backend asks the model and, if its reply is unusable, falls back to the
    template with `error` saying why (a sampler always gets a prompt). ValueError for an empty text.
    """
    text = re.sub(r"\s+", " ", text or "").strip()
    if not text:
        raise ValueError("the prompt to expand is empty")
    if config is None:
        s = ExpandSettings()
    elif isinstance(config, ExpandSettings):
        s = config
    elif isinstance(config, dict):
        s = ExpandSettings.model_validate(config)
    else:
        s = ExpandSettings.model_validate(config.model_dump(include=set(ExpandSettings.model_fields)))
    facts = ClipFacts(duration_s=s.duration_s, aspect=s.aspect)
    template = ExpandedPrompt(text, describe(text, facts), TEMPLATE_MODEL)
    if s.builtin:
        return template
    backend = _text_backend(s)
    res = backend.generate([GenRequest(prompt=expand_request(text, facts), system=s.system_prompt or EXPAND_SYSTEM)])[0]
    error = res.error
    if res.ok:
        try:
            short, long = parse_expansion(res.text or "")
            return ExpandedPrompt(short, long, backend.model_name, None, res.tokens)
        except ValueError as exc:
            error = one_line(exc)
    log.warning("expand_prompt: %s gave no usable expansion (%s); using the template", backend.model_name, error)
    template.error = f"{backend.model_name}: {error}"
    return template
