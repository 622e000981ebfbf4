"""caption: a dense caption per kept clip, from a vision-language model or (offline) from measured metadata.

One row per clip (level "clip"). Reads the "caption" frame set (`FRAME_SET`: 8 frames spread evenly over
the clip, first and last included, longer side 448 px; a recipe can replace it by declaring a frame set
named "caption" under the frames stage, e.g. `extra_sets: [{name: caption, fps: 1, max_side: 448}]`) and
the columns earlier stages measured (duration, camera motion, OCR text, source caption). Adds:

* `caption`: the caption (NULL for rejected clips, `kept` = false, and for failed ones);
* `caption_model`: who wrote it: the model (hub id, path or server model name) or "clipmill/metadata";
* `caption_error`: why captioning failed after the backend's retries (timeout, http 5xx, malformed reply,
  context overflow, or "backend unavailable: ..." when the model could not be loaded at all); the clip and its
  video are still written, and `clipmill caption OUT --where
  "caption IS NULL"` retries later;
* `dominant_colors`: the clip's dominant colour names (see recaption/facts.py for the palette).

It drops its frame set afterwards. Place it after `filter` (it reads `kept` when present, so rejected clips
cost nothing); the global `dedup` runs after the whole run, so duplicates are captioned too. Backends and
their settings: recaption/config.py; the prompt: recaption/prompts.py.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from clipmill.recaption.backends import BackendUnavailable
from clipmill.recaption.core import CaptionSettings, caption_clips, load_backend
from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import row_frames

log = logging.getLogger(__name__)

CAPTION = "caption"
CAPTION_MODEL = "caption_model"
CAPTION_ERROR = "caption_error"
DOMINANT_COLORS = "dominant_colors"

#: The frames a captioner sees: 8 evenly spread, longer side 448 (Qwen2-VL-style models tile 448 into 16x16
#: patches of 28 px; smaller models accept it too).
FRAME_SET = FrameSpec("caption", n=8, max_side=448)
FRAMES_COL, SHAPE_COL = FRAME_SET.columns


class CaptionConfig(CaptionSettings, StageConfig):
    """Settings of the caption stage (backend, model, batching, frames): see CaptionSettings/GenerationConfig.

    Args:
        only_kept: caption only clips the filter kept (`kept` not false); rejected clips get NULL.
    """

    only_kept: bool = True


def wanted(row: dict[str, Any], only_kept: bool) -> bool:
    """Whether a clip row should be captioned (kept or not filtered at all, unless only_kept is off)."""
    return not only_kept or row.get("kept") is not False


class Caption(RowStage):
    """Caption kept clips with the configured backend (see the module docstring); failures become data."""

    name: ClassVar[str] = "caption"
    Config: ClassVar[type[StageConfig]] = CaptionConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = (FRAMES_COL, SHAPE_COL)
    adds: ClassVar[dict[str, pa.DataType]] = {CAPTION: pa.string(), CAPTION_MODEL: pa.string(),
                                               CAPTION_ERROR: pa.string(), DOMINANT_COLORS: pa.list_(pa.string())}
    drops: ClassVar[tuple[str, ...]] = (FRAMES_COL, SHAPE_COL)
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = (FRAME_SET,)
    uses_model: ClassVar[bool] = True
    batch_size: ClassVar[int] = 8

    cfg: CaptionConfig

    def __init__(self, cfg: StageConfig | None = None) -> None:
        super().__init__(cfg)
        load_backend(self.cfg)  # once per worker, outside the timed per-batch calls; failures surface per clip

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        todo = [i for i, r in enumerate(rows) if wanted(r, self.cfg.only_kept)]
        out = [dict(r, **{CAPTION: None, CAPTION_MODEL: None, CAPTION_ERROR: None, DOMINANT_COLORS: None})
               for r in rows]
        if not todo:
            return out
        clips = [(rows[i], row_frames(rows[i], FRAME_SET, self.name, 64)) for i in todo]
        try:
            results = caption_clips(clips, self.cfg)
        except BackendUnavailable as exc:  # recorded per clip: the video is still written, captions retried later
            log.warning("caption: %s", exc)
            for i in todo:
                out[i].update({CAPTION_MODEL: self.cfg.model, CAPTION_ERROR: f"backend unavailable: {exc}"})
            return out
        for i, res in zip(todo, results, strict=True):
            out[i].update({CAPTION: res.caption, CAPTION_MODEL: res.model, CAPTION_ERROR: res.error,
                           DOMINANT_COLORS: res.colours or None})
        return out
