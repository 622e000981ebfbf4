"""filter: recipe thresholds -> `kept` and `reject_reasons` per clip.

Every threshold that a clip fails adds one reason, written as `<column><op><threshold>` (for example
`sharpness<40` or `black_fraction>0.5`), so a user can count and query why clips were dropped and
re-filter later with SQL without re-scoring. A score that is NULL (its stage did not run) never rejects.
This stage scores nothing itself.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import RowStage, StageConfig


class FilterConfig(StageConfig):
    """Thresholds (None switches a test off).

    Args:
        min_brightness: reject clips darker than this mean luma (0-255).
        max_brightness: reject clips brighter than this mean luma (0-255).
        min_contrast: reject flat clips below this luma standard deviation.
        min_sharpness: reject blurry clips below this Laplacian variance (scale: see stages/quality.py).
        max_black_fraction: reject clips with more than this fraction of black sampled frames.
        reject_static: reject clips with no visible change between sampled frames.
        min_duration_s: reject clips shorter than this (the split stage normally guarantees it).
        max_brisque: reject clips whose BRISQUE score (lower = better) is above this.
        max_blockiness: reject clips with stronger compression blocking than this.
        max_exposure: reject clips with more than this fraction of clipped (black/white) pixels.
        reject_slideshow: reject sequences of still images.
        min_motion_score: reject clips with less camera/scene motion than this.
        max_motion_score: reject clips with more motion than this (shaky, whip pans).
        max_text_area: reject clips whose on-screen text covers more than this fraction of the frame.
        max_nsfw_score: reject clips whose NSFW probability is above this.
        min_aesthetic_score: reject clips below this aesthetic score (1-10 scale of the LAION head).
    """

    min_brightness: float | None = Field(16.0, ge=0, le=255)
    max_brightness: float | None = Field(240.0, ge=0, le=255)
    min_contrast: float | None = Field(8.0, ge=0)
    min_sharpness: float | None = Field(None, ge=0)
    max_black_fraction: float | None = Field(0.5, ge=0, le=1)
    reject_static: bool = True
    min_duration_s: float | None = Field(None, ge=0)
    max_brisque: float | None = Field(None)
    max_blockiness: float | None = Field(None, ge=0)
    max_exposure: float | None = Field(None, ge=0, le=1)
    reject_slideshow: bool = False
    min_motion_score: float | None = Field(None, ge=0)
    max_motion_score: float | None = Field(None, ge=0)
    max_text_area: float | None = Field(None, ge=0, le=1)
    max_nsfw_score: float | None = Field(None, ge=0, le=1)
    min_aesthetic_score: float | None = Field(None)


def reject_reasons(row: dict[str, Any], cfg: FilterConfig) -> list[str]:
    """The reasons a clip fails `cfg` (empty list = kept)."""
    reasons: list[str] = []

    def below(col: str, thr: float | None) -> None:
        v = row.get(col)
        if thr is not None and v is not None and v < thr:
            reasons.append(f"{col}<{thr:g}")

    def above(col: str, thr: float | None) -> None:
        v = row.get(col)
        if thr is not None and v is not None and v > thr:
            reasons.append(f"{col}>{thr:g}")

    below("brightness", cfg.min_brightness)
    above("brightness", cfg.max_brightness)
    below("contrast", cfg.min_contrast)
    below("sharpness", cfg.min_sharpness)
    above("black_fraction", cfg.max_black_fraction)
    if cfg.reject_static and row.get("static"):
        reasons.append("static")
    above("brisque", cfg.max_brisque)
    above("blockiness", cfg.max_blockiness)
    above("exposure", cfg.max_exposure)
    if cfg.reject_slideshow and row.get("slideshow"):
        reasons.append("slideshow")
    below("motion_score", cfg.min_motion_score)
    above("motion_score", cfg.max_motion_score)
    above("text_area", cfg.max_text_area)
    above("nsfw_score", cfg.max_nsfw_score)
    below("aesthetic_score", cfg.min_aesthetic_score)
    dur = row.get("clip_duration_s")
    if dur is None and row.get("end_s") is not None:
        dur = row["end_s"] - row["start_s"]
    if cfg.min_duration_s is not None and dur is not None and dur < cfg.min_duration_s:
        reasons.append(f"duration_s<{cfg.min_duration_s:g}")
    return reasons


class Filter(RowStage):
    """Apply recipe thresholds to clip scores (see the module docstring)."""

    name = "filter"
    Config = FilterConfig
    level = "clip"
    reads = ("clip_index",)
    adds = {"kept": pa.bool_(), "reject_reasons": pa.list_(pa.string())}
    num_cpus = 1.0

    cfg: FilterConfig

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        reasons = reject_reasons(row, self.cfg)
        return dict(row, kept=not reasons, reject_reasons=reasons)
