"""Shot boundary detection: hard cuts and gradual transitions, from one small-size decode of a video.

(work in progress)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import cv2
import numpy as np

log = logging.getLogger(__name__)

SMALL_W, SMALL_H = 48, 27  # TransNetV2's input size; also what the default detector works on
CHROMA_W, CHROMA_H = 24, 14

_PLANAR_YUV = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p"}

Source = str | os.PathLike | BinaryIO


@dataclass
class SmallFrames:
    """Every frame of a video, decoded once and shrunk: Y at 48x27, U and V at 24x14 (uint8)."""

    fps: Fraction
    time_base: Fraction
    pts: np.ndarray
    y: np.ndarray  # (n, 27, 48)
    u: np.ndarray  # (n, 14, 24)
    v: np.ndarray  # (n, 14, 24)

    @property
    def n(self) -> int:
        return len(self.pts)


def _plane_array(plane) -> np.ndarray:
    """A view of one plane's pixels (no copy), dropping the line padding."""
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


def _shrink(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Area-average a plane down to w x h, cropping a few edge pixels so the factor is an integer (fast path)."""
    ph, pw = a.shape
    kx, ky = pw // w, ph // h
    if kx < 1 or ky < 1:
        return cv2.resize(np.ascontiguousarray(a), (w, h), interpolation=cv2.INTER_LINEAR)
    ox, oy = (pw - kx * w) // 2, (ph - ky * h) // 2
    return cv2.resize(a[oy : oy + ky * h, ox : ox + kx * w], (w, h), interpolation=cv2.INTER_AREA)


def _iter_frames(source: Source, fast: bool) -> Iterator[tuple[av.VideoFrame, Fraction, Fraction]]:
    """Decode the first video stream of ``source`` in order, yielding (frame, fps, time_base).

    ``fast`` skips the H.264/HEVC deblocking loop filter (harmless at detection sizes, ~25% faster).
    """
    src = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
    try:
        container = av.open(src)
    except av.FFmpegError as exc:
        raise ValueError(f"cannot open video {source!r}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {source!r}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if fast:
            stream.codec_context.options = {"skip_loop_filter": "all"}
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
        fps = Fraction(rate)
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1)
        for frame in container.decode(stream):
            yield frame, fps, time_base


def decode_small(source: Source, *, progress: Callable[[int], None] | None = None, fast: bool = True) -> SmallFrames:
    """Decode every frame of ``source`` once into small Y/U/V planes plus PTS (see :class:`SmallFrames`).

    Works on the decoder's own YUV planes (no full-size RGB conversion); other pixel formats are first
    converted to yuv420p. ``progress`` is called with the number of frames decoded so far, every 100 frames.
    """
    ys, us, vs, pts = [], [], [], []
    fps, time_base = Fraction(25), Fraction(1, 1)
    for frame, fps, time_base in _iter_frames(source, fast):
        if frame.format.name not in _PLANAR_YUV:
            frame = frame.reformat(format="yuv420p")
        planes = frame.planes
        ys.append(_shrink(_plane_array(planes[0]), SMALL_W, SMALL_H))
        us.append(_shrink(_plane_array(planes[1]), CHROMA_W, CHROMA_H))
        vs.append(_shrink(_plane_array(planes[2]), CHROMA_W, CHROMA_H))
        pts.append(-1 if frame.pts is None else frame.pts)
        if progress is not None and len(pts) % 100 == 0:
            progress(len(pts))
    if progress is not None:
        progress(len(pts))

    def stack(arrs: list[np.ndarray], h: int, w: int) -> np.ndarray:
        return np.stack(arrs) if arrs else np.zeros((0, h, w), np.uint8)

    return SmallFrames(fps, time_base, np.asarray(pts, np.int64), stack(ys, SMALL_H, SMALL_W),
                       stack(us, CHROMA_H, CHROMA_W), stack(vs, CHROMA_H, CHROMA_W))
