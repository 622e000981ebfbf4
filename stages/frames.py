"""Frames stage: decode each clip's MP4 bytes once into a small, evenly spaced sample of RGB frames.

One row per clip (level "clip"). Reads `media` (the transcode stage's MP4 bytes). Adds `frames` (raw
uint8 RGB bytes of an array shaped `frames_shape` = [n, h, w, 3]), `frames_shape` and `thumbnail` (JPEG of
the clip's middle frame). Later stages (quality, motion, ...) read the sample with `unpack_frames` instead
of decoding the video again. The sample is `n` frames spaced evenly over the clip, first and last
included (fewer when the clip is shorter than `n`), scaled so the longer side is at most `max_side`.
"""

from __future__ import annotations

import io
import logging
from typing import Any, ClassVar

import av
import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import RowStage, StageConfig

log = logging.getLogger(__name__)

FRAMES = "frames"
FRAMES_SHAPE = "frames_shape"
THUMBNAIL = "thumbnail"


class FramesConfig(StageConfig):
    """Settings of the frames stage.

    Args:
        n: frames to sample per clip, evenly spaced, first and last included (1 = the middle frame).
        max_side: longer side of the sampled frames in pixels (smaller clips are not upscaled).
        thumb_side: longer side of the JPEG thumbnail in pixels (not upscaled either).
        jpeg_quality: JPEG quality of the thumbnail (1-100).
    """

    n: int = Field(8, ge=1, le=512)
    max_side: int = Field(256, ge=8)
    thumb_side: int = Field(256, ge=8)
    jpeg_quality: int = Field(90, ge=1, le=100)


def sample_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` distinct frame indices spread evenly over [0, total), first and last included."""
    if total <= 0:
        return []
    if n == 1:
        return [total // 2]
    if n >= total:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, n)})


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def decode_sample(media: bytes, n: int, max_side: int, thumb_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode MP4 bytes once; return (sampled RGB frames (k, h, w, 3), middle frame RGB at thumb size)."""
    with av.open(io.BytesIO(media), mode="r") as c:
        if not c.streams.video:
            raise ValueError("media has no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        total = vs.frames
        if total <= 0:  # no frame count in the container: count by decoding (rare; our MP4s have one)
            total = sum(1 for _ in c.decode(vs))
            c.seek(0)
        wanted = set(sample_indices(total, n))
        middle = total // 2
        picked: list[np.ndarray] = []
        thumb = None
        last = max(wanted | {middle})
        for i, frame in enumerate(c.decode(vs)):
            if i in wanted:
                w, h = _fit(frame.width, frame.height, max_side)
                picked.append(frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA"))
            if i == middle:
                w, h = _fit(frame.width, frame.height, thumb_side)
                thumb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
            if i >= last:
                break
    if thumb is None or len(picked) != len(wanted):
        raise ValueError(f"media decoded to {len(picked)} of {len(wanted)} sampled frames (container says {total})")
    return np.stack(picked), thumb


class Frames(RowStage):
    """Decode each clip's `media` once into `n` evenly spaced small RGB frames plus a JPEG thumbnail.

    Keeps the frames in the row as raw bytes (`frames`, `frames_shape`) for later stages; it does not
    compute any score and does not keep every frame (a stage that needs dense frames must say so).
    """

    name: ClassVar[str] = "frames"
    Config: ClassVar[type[StageConfig]] = FramesConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ("media",)
    adds: ClassVar[dict[str, pa.DataType]] = {
        FRAMES: pa.binary(),
        FRAMES_SHAPE: pa.list_(pa.int32()),
        THUMBNAIL: pa.binary(),
    }
    batch_size: ClassVar[int] = 8

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg: FramesConfig = self.cfg  # type: ignore[assignment]
        media = row.get("media")
        if not media:
            raise ValueError("row has no media bytes (run the transcode stage first)")
        frames, thumb = decode_sample(media, cfg.n, cfg.max_side, cfg.thumb_side)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed to write the JPEG thumbnail")
        return dict(row, **{FRAMES: frames.tobytes(), FRAMES_SHAPE: list(frames.shape), THUMBNAIL: jpeg.tobytes()})
