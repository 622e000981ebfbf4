"""Frames stage: decode each clip's MP4 bytes once into the small RGB frame sets later stages need.

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

from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import pick_frames

log = logging.getLogger(__name__)

FRAMES = "frames"
FRAMES_SHAPE = "frames_shape"
THUMBNAIL = "thumbnail"


class FrameSetConfig(StageConfig):
    """One extra frame set (see FrameSpec in stages/base.py): `name`, and `n` or `fps`, and `max_side`."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    n: int | None = Field(None, ge=1, le=512)
    fps: float | None = Field(None, gt=0, le=120)
    max_side: int = Field(256, ge=8)


class FramesConfig(StageConfig):
    """Settings of the frames stage.

    Args:
        n: frames to sample per clip, evenly spaced, first and last included (1 = the middle frame).
        max_side: longer side of the sampled frames in pixels (smaller clips are not upscaled).
        thumb_side: longer side of the JPEG thumbnail in pixels (not upscaled either).
        jpeg_quality: JPEG quality of the thumbnail (1-100).
        extra_sets: more frame sets; the recipe loader adds the ones later stages declare.
    """

    n: int = Field(8, ge=1, le=512)
    max_side: int = Field(256, ge=8)
    thumb_side: int = Field(256, ge=8)
    jpeg_quality: int = Field(90, ge=1, le=100)
    extra_sets: tuple[FrameSetConfig, ...] = ()


def sample_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` distinct frame indices spread evenly over [0, total), first and last included."""
    return pick_frames(total, n)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def set_indices(total: int, clip_fps: float, spec: FrameSpec) -> list[int]:
    """Frame indices of one frame set for a clip of `total` frames at `clip_fps`."""
    if spec.n is not None:
        return sample_indices(total, spec.n)
    step = max(clip_fps / float(spec.fps), 1.0) if clip_fps > 0 else 1.0
    idx = sorted({min(total - 1, int(round(k * step))) for k in range(int((total - 1) / step) + 1)})
    return idx if len(idx) >= 2 or total < 2 else [0, total - 1]


def decode_sets(media: bytes, specs: list[FrameSpec], thumb_side: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Decode MP4 bytes once; return ({set name: RGB frames (k, h, w, 3)}, middle frame RGB at thumb size)."""
    with av.open(io.BytesIO(media), mode="r") as c:
        if not c.streams.video:
            raise ValueError("media has no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        total = vs.frames
        if total <= 0:  # no frame count in the container: count by decoding (rare; our MP4s have one)
            total = sum(1 for _ in c.decode(vs))
            c.seek(0)
        clip_fps = float(vs.average_rate or 0)
        wanted = {spec.name: set(set_indices(total, clip_fps, spec)) for spec in specs}
        middle = total // 2
        picked: dict[str, list[np.ndarray]] = {spec.name: [] for spec in specs}
        thumb = None
        last = max(set().union(*wanted.values()) | {middle})
        for i, frame in enumerate(c.decode(vs)):
            for spec in specs:
                if i in wanted[spec.name]:
                    w, h = _fit(frame.width, frame.height, spec.max_side)
                    picked[spec.name].append(
                        frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA"))
            if i == middle:
                w, h = _fit(frame.width, frame.height, thumb_side)
                thumb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
            if i >= last:
                break
    for spec in specs:
        if len(picked[spec.name]) != len(wanted[spec.name]):
            raise ValueError(f"media decoded to {len(picked[spec.name])} of {len(wanted[spec.name])} frames of set "
                             f"{spec.name!r} (container says {total})")
    if thumb is None:
        raise ValueError(f"media has no middle frame (container says {total} frames)")
    return {name: np.stack(frames) for name, frames in picked.items()}, thumb


def decode_sample(media: bytes, n: int, max_side: int, thumb_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode MP4 bytes once; return (n evenly spaced RGB frames (k, h, w, 3), middle frame at thumb size)."""
    sets, thumb = decode_sets(media, [FrameSpec("default", n=n, max_side=max_side)], thumb_side)
    return sets["default"], thumb


class Frames(RowStage):
    """Decode each clip's `media` once into the frame sets later stages declare, plus a JPEG thumbnail.

    The "default" set (`n` evenly spaced frames at `max_side`) is always made; stages that need other
    frames declare a FrameSpec (see stages/base.py) and the recipe loader adds it to `extra_sets`. Keeps
    the frames in the row as raw bytes (`frames_<set>`, `frames_<set>_shape`) for later stages; it does not
    compute any score.
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

    @classmethod
    def added_columns(cls, cfg: StageConfig | None = None) -> dict[str, pa.DataType]:
        cols = dict(cls.adds)
        for spec in _specs(cfg or cls.Config())[1:]:
            blob, shape = spec.columns
            cols[blob], cols[shape] = pa.binary(), pa.list_(pa.int32())
        return cols

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg: FramesConfig = self.cfg  # type: ignore[assignment]
        media = row.get("media")
        if not media:
            raise ValueError("row has no media bytes (run the transcode stage first)")
        sets, thumb = decode_sets(media, _specs(cfg), cfg.thumb_side)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed to write the JPEG thumbnail")
        out = dict(row, **{THUMBNAIL: jpeg.tobytes()})
        for spec in _specs(cfg):
            blob, shape = spec.columns
            out[blob], out[shape] = sets[spec.name].tobytes(), list(sets[spec.name].shape)
        return out


def _specs(cfg: FramesConfig) -> list[FrameSpec]:
    default = FrameSpec("default", n=cfg.n, max_side=cfg.max_side)
    return [default] + [FrameSpec(e.name, n=e.n, fps=e.fps, max_side=e.max_side)
                        for e in cfg.extra_sets if e.name != "default"]
