"""Synthetic test videos with known ground truth, written with PyAV + NumPy (no ffmpeg binary needed).

Two layers:

* :func:`write_video` encodes any iterable of RGB frames to a file (container chosen by suffix).
* Scene builders (:func:`make_shots_video` and the named cases in :data:`CASES`, via :func:`make_case`)
  render shots of textured, camera-moving content joined by hard cuts, dissolves and fades, with optional
  white flashes, and return the ground truth as a plain dict::

      {"fps": 25.0, "n_frames": 210, "width": 642, "height": 362,
       "cuts": [60, ...],                 # frame where a new shot starts after a hard cut (0 never listed)
       "transitions": [[90, 109], ...],  # [first, last] frame of each gradual transition (inclusive)
       "transition_types": ["dissolve", ...],
       "flashes": [[30, 31], ...],        # [first, last] bright frames inside a shot (not cuts)
       "shots": [[0, 59], ...]}           # [first, last] frame of each shot's own frames

Frame indices are 0-based in decode order. Content is deterministic for a given seed: each shot gets its
own random multi-scale texture and palette, seen through a smoothly moving virtual camera (pan/zoom/rotate).
Nothing here inspects or decodes videos; it only writes them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CASES",
    "Shot",
    "keep_thread_scheduling",
    "make_case",
    "make_shots_video",
    "render_shots",
    "write_video",
]

_CONTAINER_BY_SUFFIX = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".mov": "mov"}
_DEFAULT_OPTIONS = {
    "libx264": {"preset": "veryfast", "crf": "20"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b:v": "0"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b:v": "2M"},
}
MOTIONS = ("pan", "zoom", "static", "fast", "black")
TRANSITIONS = ("cut", "dissolve", "fade")


def _as_rate(fps: float | Fraction | int) -> Fraction:
    """Turn a frame rate into an exact Fraction (29.97 -> 30000/1001)."""
    if isinstance(fps, Fraction):
        rate = fps
    else:
        rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Replicate the last row/column so both dimensions are even (needed by yuv420p)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


@contextlib.contextmanager
def keep_thread_scheduling() -> Iterator[None]:
    """Restore the calling thread's scheduling policy when the block ends, if an encoder changed it.

    SVT-AV1 (PyAV's ``libsvtav1``), run as root, leaves the thread that opened it in SCHED_FIFO at real-time
    priority 99 (measured: ``os.sched_getscheduler(0)`` 0 -> 1 after one small encode). Every thread that
    thread starts afterwards inherits it: torch's OpenMP workers, HTTP server threads. Busy-waiting real-time
    threads then leave normal processes about 5% of a core (the kernel's RT throttling), which is how a test
    session slowed to a crawl long after it had written an AV1 fixture.
    """
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy or os.sched_getparam(0).sched_priority != param.sched_priority:
            try:
                os.sched_setscheduler(0, policy, param)
            except OSError as exc:  # pragma: no cover - lowering one's own priority is always allowed
                log.warning("could not restore the thread's scheduling policy after encoding: %s", exc)


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
) -> int:
    """Encode RGB frames (H x W x 3 uint8) to ``path`` and return the number of frames written.

    The container comes from the suffix (.mp4, .mkv, .webm, .avi, .mov). For .webm the default codec
    ``libx264`` is replaced by ``libvpx-vp9`` (WebM cannot hold H.264). With a 4:2:0/4:2:2 ``pix_fmt``
    odd widths/heights are padded by one replicated row/column, so a 641x361 input becomes 642x362.
    ``options`` are passed to the encoder (e.g. ``{"crf": "18", "g": "48"}``); without them a fast,
    good-quality default is used for libx264/libvpx. All frames must have the same size.
    Does not write audio, and does not check that the frames are meaningful.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CONTAINER_BY_SUFFIX:
        raise ValueError(f"unsupported suffix {suffix!r}; allowed: {sorted(_CONTAINER_BY_SUFFIX)}")
    if suffix == ".webm" and codec == "libx264":
        codec = "libvpx-vp9"
    rate = _as_rate(fps)
    opts = dict(_DEFAULT_OPTIONS.get(codec, {})) if options is None else dict(options)
    needs_even = pix_fmt.startswith(("yuv420", "yuvj420", "nv12", "yuv422", "yuvj422"))

    n = 0
    with keep_thread_scheduling(), av.open(str(path), mode="w", format=_CONTAINER_BY_SUFFIX[suffix]) as container:
        stream = None
        for frame in frames:
            arr = np.ascontiguousarray(frame)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"frames must be HxWx3 uint8 RGB, got {arr.dtype} {arr.shape}")
            if needs_even:
                arr = _pad_even(arr)
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = arr.shape[1], arr.shape[0]
                stream.pix_fmt = pix_fmt
                stream.codec_context.time_base = 1 / rate
                stream.options = opts
            elif (arr.shape[1], arr.shape[0]) != (stream.width, stream.height):
                raise ValueError(f"frame {n} is {arr.shape[1]}x{arr.shape[0]}, expected {stream.width}x{stream.height}")
            vf = av.VideoFrame.from_ndarray(arr, format="rgb24")
            vf.pts = n
            vf.time_base = 1 / rate
            for packet in stream.encode(vf):
                container.mux(packet)
            n += 1
        if stream is None:
            raise ValueError("no frames to write")
        for packet in stream.encode(None):
            container.mux(packet)
    log.debug("wrote %s: %d frames at %s fps (%s)", path, n, rate, codec)
    return n


# --------------------------------------------------------------------------------------------------
# Content: textured scenes seen through a moving camera
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One shot of synthetic content.

    ``frames``: number of frames of the shot itself (transition frames come on top of it).
    ``motion``: "pan" (smooth slow pan + slight zoom), "zoom" (zoom in with a little rotation), "static"
    (camera still, tiny sensor noise), "fast" (whip pans plus a large foreground object crossing: a
    false-positive trap), "black" (a black screen, e.g. between fades).
    ``enter``: how this shot begins after the previous one: "cut", "dissolve" (``enter_frames`` blended
    frames from the previous shot) or "fade" (previous shot fades out to black over ``enter_frames``,
    then this shot fades in from black over ``enter_frames``; no black frame in between).
    ``flashes``: (offset within the shot, length) pairs of near-white frames (camera flash).
    """

    frames: int
    motion: str = "pan"
    enter: str = "cut"
    enter_frames: int = 0
    flashes: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"a shot needs at least 1 frame, got {self.frames}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        if self.enter not in TRANSITIONS:
            raise ValueError(f"enter must be one of {TRANSITIONS}, got {self.enter!r}")
        if self.enter != "cut" and self.enter_frames < 1:
            raise ValueError(f"enter={self.enter!r} needs enter_frames >= 1")
        for off, length in self.flashes:
            if length < 1 or off < 0 or off + length > self.frames:
                raise ValueError(f"flash ({off}, {length}) does not fit in a {self.frames}-frame shot")


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random colour texture (float32 HxWx3 in 0..255): multi-scale noise, a palette and some shapes."""
    base = np.zeros((height, width), np.float32)
    for cells, weight in ((4, 1.0), (12, 0.6), (40, 0.35), (120, 0.2)):
        ch = max(2, int(cells * height / width))
        small = rng.standard_normal((ch, cells)).astype(np.float32)
        base += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    base = (base - base.mean()) / (base.std() + 1e-6)
    detail = cv2.resize(rng.standard_normal((height // 2, width // 2)).astype(np.float32), (width, height))
    # Palette: two random colours mixed by the smooth field, plus fine luminance detail.
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    t = 1.0 / (1.0 + np.exp(-1.5 * base))
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img += (18.0 * detail)[..., None]
    # Hard-edged shapes give the camera something with edges to track.
    for _ in range(int(rng.integers(12, 24))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(4, width // 60), max(8, width // 10)))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), size, colour, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (x, y), (x + size, y + int(size * rng.uniform(0.3, 1.5))), colour, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


class _ShotRenderer:
    """Renders frame k of one shot: a texture viewed by a camera following a smooth path."""

    def __init__(self, shot: Shot, width: int, height: int, seed: int) -> None:
        self.shot, self.width, self.height = shot, width, height
        rng = np.random.default_rng(seed)
        self.tex = None if shot.motion == "black" else _texture(rng, 2 * width, 2 * height)
        self.phase = rng.uniform(0, 2 * math.pi, 4)
        self.direction = rng.choice([-1.0, 1.0], 2)
        self.noise_rng = np.random.default_rng(seed + 1)
        if shot.motion == "fast":
            self.occluder = _texture(rng, width // 2, height)

    def _camera(self, k: int) -> tuple[float, float, float, float]:
        """Camera centre offset (x, y) in texture pixels, zoom factor and rotation (degrees) at frame k."""
        w, m, p, d = self.width, self.shot.motion, self.phase, self.direction
        if m == "static":
            return 0.0, 0.0, 1.0, 0.0
        if m == "pan":
            return (d[0] * 1.5 * k * w / 640, d[1] * 0.6 * k * w / 640 + 4 * math.sin(0.05 * k + p[0]),
                    1.0 + 0.03 * math.sin(0.02 * k + p[1]), 0.0)
        if m == "zoom":
            return (2 * math.sin(0.03 * k + p[0]), 2 * math.sin(0.04 * k + p[1]), 1.0 + 0.006 * k,
                    0.1 * k * d[0])
        # fast: whip pans whose speed swings between 8 and 40 px/frame (at 640 px width): the position
        # is the integral of speed(k) = 8 + 32 sin^2(0.07 k + phase)
        pos = w / 640 * (24 * k - 16 * (math.sin(0.14 * k + 2 * p[2]) - math.sin(2 * p[2])) / 0.14)
        return (d[0] * pos, 0.3 * d[1] * pos, 1.0 + 0.05 * math.sin(0.1 * k + p[3]), 0.0)

    def frame(self, k: int) -> np.ndarray:
        """uint8 RGB frame k of this shot; k may run past the shot's length or be negative (transitions)."""
        h, w = self.height, self.width
        if self.tex is None:
            return np.zeros((h, w, 3), np.uint8)
        dx, dy, zoom, rot = self._camera(k)
        th, tw = self.tex.shape[:2]
        mat = cv2.getRotationMatrix2D((tw / 2 + dx, th / 2 + dy), rot, zoom)
        mat[:, 2] += (w / 2 - (tw / 2 + dx), h / 2 - (th / 2 + dy))
        img = cv2.warpAffine(self.tex, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if self.shot.motion == "fast":
            self._draw_occluder(img, k)
        if self.shot.motion == "static":
            noise = self.noise_rng.integers(-2, 3, img.shape, dtype=np.int16)
            img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        return img

    def _draw_occluder(self, img: np.ndarray, k: int) -> None:
        """A big foreground object crossing the frame every 40 frames, in about 16 frames."""
        w = self.width
        period, cross = 40, 16
        t = k % period
        if t >= cross:
            return
        ow = self.occluder.shape[1]
        x0 = int(-ow + (w + ow) * t / (cross - 1))
        a, b = max(0, x0), min(w, x0 + ow)
        if a < b:
            img[:, a:b] = self.occluder[:, a - x0 : b - x0]


def _flash(img: np.ndarray, strength: float = 0.85) -> np.ndarray:
    """Blow out a frame toward white, as a photographic flash does."""
    return img.astype(np.float32) * (1 - strength) + 255.0 * strength


def render_shots(
    shots: Sequence[Shot], width: int, height: int, seed: int = 0
) -> tuple[Callable[[], Iterator[np.ndarray]], dict]:
    """Plan a sequence of shots; return (frame generator factory, ground truth dict).

    The generator yields uint8 RGB frames lazily (a long 720p video never sits in memory). The truth
    dict has the keys described in the module docstring (fps is added by the writers).
    """
    if not shots:
        raise ValueError("need at least one shot")
    if width < 16 or height < 16:
        raise ValueError(f"size must be at least 16x16, got {width}x{height}")
    renderers = [_ShotRenderer(s, width, height, seed * 1000 + i) for i, s in enumerate(shots)]
    # Plan: a list of (kind, payload) per output frame.
    plan: list[tuple] = []
    truth: dict = {"cuts": [], "transitions": [], "transition_types": [], "flashes": [], "shots": []}
    for i, shot in enumerate(shots):
        if i > 0:
            prev, k_prev = i - 1, shots[i - 1].frames
            n = shot.enter_frames
            if shot.enter == "cut":
                truth["cuts"].append(len(plan))
            elif shot.enter == "dissolve":
                truth["transitions"].append([len(plan), len(plan) + n - 1])
                truth["transition_types"].append("dissolve")
                plan += [("blend", prev, k_prev + j, i, j - n, (j + 1) / (n + 1)) for j in range(n)]
            else:  # fade: out to black, then in from black
                if shots[i - 1].motion != "black":
                    truth["transitions"].append([len(plan), len(plan) + n - 1])
                    truth["transition_types"].append("fade_out")
                    plan += [("fade", prev, k_prev + j, 1 - (j + 1) / (n + 1)) for j in range(n)]
                if shot.motion != "black":
                    truth["transitions"].append([len(plan), len(plan) + n - 1])
                    truth["transition_types"].append("fade_in")
                    plan += [("fade", i, j - n, (j + 1) / (n + 1)) for j in range(n)]
        start = len(plan)
        flash_at = {off + j for off, length in shot.flashes for j in range(length)}
        for off, length in shot.flashes:
            truth["flashes"].append([start + off, start + off + length - 1])
        plan += [("shot", i, k, k in flash_at) for k in range(shot.frames)]
        truth["shots"].append([start, len(plan) - 1])
    truth.update(n_frames=len(plan), width=width, height=height)

    def frames() -> Iterator[np.ndarray]:
        for step in plan:
            if step[0] == "shot":
                _, i, k, flash = step
                img = renderers[i].frame(k)
                if flash:
                    img = _flash(img)
            elif step[0] == "blend":
                _, a, ka, b, kb, alpha = step
                img = cv2.addWeighted(renderers[a].frame(ka), 1 - alpha, renderers[b].frame(kb), alpha, 0.0)
            else:
                _, i, k, level = step
                img = cv2.convertScaleAbs(renderers[i].frame(k), alpha=level)
            if img.dtype != np.uint8:
                img = np.clip(img, 0, 255).astype(np.uint8)
            yield img

    return frames, truth


def make_shots_video(
    path: str | os.PathLike,
    shots: Sequence[Shot],
    *,
    width: int = 642,
    height: int = 362,
    fps: float = 25.0,
    seed: int = 0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
) -> dict:
    """Render ``shots`` to a video file at ``path`` and return its ground truth dict.

    Keys: fps, n_frames, width, height (as requested; the file may be padded to even size), cuts,
    transitions ([first, last] lists), transition_types, flashes ([first, last] lists), shots, path.
    Deterministic for a given seed and encoder settings.
    """
    frames, truth = render_shots(shots, width, height, seed)
    n = write_video(path, frames(), fps, codec=codec, pix_fmt=pix_fmt, options=options)
    if n != truth["n_frames"]:
        raise RuntimeError(f"wrote {n} frames, planned {truth['n_frames']}")
    truth.update(fps=float(_as_rate(fps)), path=str(path))
    return truth


# --------------------------------------------------------------------------------------------------
# Named cases
# --------------------------------------------------------------------------------------------------


def _case_cuts() -> list[Shot]:
    return [Shot(40), Shot(35, "zoom"), Shot(30, "pan"), Shot(45, "zoom")]


def _case_flash() -> list[Shot]:
    return [Shot(50, "pan", flashes=((12, 1), (30, 2))), Shot(40, "zoom", flashes=((20, 3),))]


def _case_dissolve() -> list[Shot]:
    return [Shot(40, "pan"), Shot(40, "zoom", enter="dissolve", enter_frames=20), Shot(30, "pan",
            enter="dissolve", enter_frames=15)]


def _case_fades() -> list[Shot]:
    return [Shot(40, "pan"), Shot(10, "black", enter="fade", enter_frames=20),
            Shot(40, "zoom", enter="fade", enter_frames=20), Shot(30, "pan", enter="fade", enter_frames=15)]


def _case_fast_motion() -> list[Shot]:
    return [Shot(120, "fast"), Shot(40, "pan")]


def _case_static() -> list[Shot]:
    return [Shot(60, "static"), Shot(40, "static")]


def _case_everything(scale: int = 1) -> list[Shot]:
    """About 560 frames per unit of ``scale``: every kind of boundary, several times."""
    block = [
        Shot(60, "pan"),
        Shot(45, "zoom", flashes=((20, 2),)),
        Shot(50, "fast"),
        Shot(40, "static", enter="dissolve", enter_frames=24),
        Shot(35, "pan", flashes=((10, 1),)),
        Shot(12, "black", enter="fade", enter_frames=18),
        Shot(50, "zoom", enter="fade", enter_frames=25),
        Shot(30, "pan"),
        Shot(45, "fast", enter="dissolve", enter_frames=16),
        Shot(25, "static", flashes=((8, 3),)),
        Shot(40, "pan", enter="fade", enter_frames=20),
    ]
    return block * scale


CASES: dict[str, Callable[[], list[Shot]]] = {
    "cuts": _case_cuts,
    "flash": _case_flash,
    "dissolve": _case_dissolve,
    "fades": _case_fades,
    "fast_motion": _case_fast_motion,
    "static": _case_static,
    "everything": _case_everything,
}


def make_case(name: str, path: str | os.PathLike, *, seed: int | None = None, scale: int = 1, **kwargs) -> dict:
    """Write the named synthetic case (one of :data:`CASES`) to ``path``; return its ground truth.

    ``scale`` repeats the "everything" block (about 22 s at 25 fps per unit); other cases ignore it.
    ``kwargs`` go to :func:`make_shots_video` (width, height, fps, codec, options, ...). The seed
    defaults to a fixed per-case value so each case always looks the same.
    """
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; allowed: {sorted(CASES)}")
    shots = CASES[name](scale) if name == "everything" else CASES[name]()
    if seed is None:
        seed = sorted(CASES).index(name) + 1
    truth = make_shots_video(path, shots, seed=seed, **kwargs)
    truth["case"] = name
    return truth
