"""expand: training prompts per captioned clip, from an LLM or (offline) from a template.

One row per clip (level "clip"). Reads `caption` (the caption stage) and the measured facts, and adds
`prompt_short` (a prompt a user might type, at most ~15 words), `prompt_long` (a dense descriptive prompt in
the style of the captions), `prompt_model` (the LLM, or "clipmill/template") and `prompt_error` (why the
expansion failed: the backend's error, or a reply without the SHORT:/LONG: lines). Rows without a caption
(rejected or failed clips) get NULLs. It writes no caption and judges nothing.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from clipmill.recaption.backends import BackendUnavailable
from clipmill.recaption.core import ExpandedPrompt, ExpandSettings, expand_clips, load_backend
from clipmill.stages.base import RowStage, StageConfig

log = logging.getLogger(__name__)

PROMPT_SHORT = "prompt_short"
PROMPT_LONG = "prompt_long"
PROMPT_MODEL = "prompt_model"
PROMPT_ERROR = "prompt_error"


class ExpandConfig(ExpandSettings, StageConfig):
    """Settings of the expand stage (backend, model, batching): see ExpandSettings/GenerationConfig."""


class Expand(RowStage):
    """Write prompt_short/prompt_long for every captioned clip (see the module docstring)."""

    name: ClassVar[str] = "expand"
    Config: ClassVar[type[StageConfig]] = ExpandConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ("caption",)
    adds: ClassVar[dict[str, pa.DataType]] = {PROMPT_SHORT: pa.string(), PROMPT_LONG: pa.string(),
                                               PROMPT_MODEL: pa.string(), PROMPT_ERROR: pa.string()}
    uses_model: ClassVar[bool] = True
    batch_size: ClassVar[int] = 16

    cfg: ExpandConfig

    def __init__(self, cfg: StageConfig | None = None) -> None:
        super().__init__(cfg)
        load_backend(self.cfg)  # once per worker, outside the timed per-batch calls; failures surface per clip

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            results = expand_clips(rows, self.cfg)
        except BackendUnavailable as exc:  # recorded per clip, like a failed reply
            log.warning("expand: %s", exc)
            results = [None if not r.get("caption") else ExpandedPrompt(None, None, str(self.cfg.model),
                                                                         f"backend unavailable: {exc}")
                       for r in rows]
        out = []
        for row, res in zip(rows, results, strict=True):
            if res is None:
                out.append(dict(row, **{PROMPT_SHORT: None, PROMPT_LONG: None, PROMPT_MODEL: None, PROMPT_ERROR: None}))
            else:
                out.append(dict(row, **{PROMPT_SHORT: res.short, PROMPT_LONG: res.long, PROMPT_MODEL: res.model,
                                        PROMPT_ERROR: res.error}))
        return out
