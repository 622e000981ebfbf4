"""Motion stage: how much a clip moves, and how its camera moves, from dense optical flow.

One row per clip (level "clip"). Reads the "motion" frame set of the frames stage (`frames_motion`,
`frames_motion_shape`: frames at `SAMPLE_FPS` per second, longer side at most `SAMPLE_MAX_SIDE`, see
stages/frames.py) and the clip's `fps`, and adds:

* `motion_score`: mean optical-flow magnitude between consecutive sampled frames, in **frame diagonals
  per second** (total displacement over the clip divided by its duration, each displacement divided by
  the frame diagonal). A pan that crosses a 16:9 frame horizontally in 10 s scores about 0.087. Measured:
  still shots 0.000-0.003 (codec noise; counter.mp4, testvideo.mp4 in the shared test videos), a still
  camera with cars passing behind a fence 0.014 and a slow pan 0.033 (bikes.mp4, shots 137-186 and
  187-241), synth's whip pans 0.6-0.7. Because it is normalised by frame size and time, it is comparable
  across clip sizes and sampling rates, within limits: a global shift (pan, tilt) is tracked up to about
  40% of the frame between two samples, other motion (zoom, objects) only up to about 1/8 of the frame,
  beyond which it is underestimated; and the noise floor of a still shot grows with the sampling rate.
  It is an area average of all motion in the frame, camera and objects: a small object crossing a still
  frame scores low.
* `camera_motion`: one of `CAMERA_MOTIONS` (static, pan_left, pan_right, tilt_up, tilt_down, zoom_in,
  zoom_out, complex), from a global affine model fitted robustly to each pair's flow.

Direction convention (the camera's point of view, as cinematographers use the words): `pan_left` means
the camera turns left, so the scene content moves to the RIGHT in the frame; `pan_right` content moves
left; `tilt_up` content moves DOWN; `tilt_down` content moves up; `zoom_in` content grows (flow points
away from the centre); `zoom_out` content shrinks. A dolly or truck (the camera moving sideways) reads as
a pan, since a 2D flow model cannot tell them apart.

How the label is chosen, per pair of consecutive samples: fit flow = A @ (x, y) + t by iteratively
reweighted least squares on a grid of points (a border of `margin` ignored); a point is an inlier when
its residual is below `fit_tol` frame diagonals (plus a quarter of the model's own flow there). A pair
whose flow moves less than `static_threshold` is "static"; else if fewer than `min_fit` of the points are
inliers it is "complex"; else if the camera model moves less than `static_threshold` it is "static" (a
still camera with something moving in front of it); else the largest of horizontal
translation, vertical translation, zoom (divergence times the mean distance from the centre) and roll
(curl, likewise) names it, roll giving "complex", and so does a largest component holding less than
`min_dominance` of the translation + zoom + roll total. The clip takes the label of at least
`min_agreement` of its pairs (of its time), otherwise "complex"; a clip whose `motion_score` is below
`static_threshold` is "static".

It drops `frames_motion` and `frames_motion_shape` (no other stage reads them) and does not judge (the
filter stage does). `flow_stats` gives the same numbers for any frame array, without the stage.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import unpack_frames

log = logging.getLogger(__name__)

MOTION_SCORE = "motion_score"
CAMERA_MOTION = "camera_motion"
FRAMES_MOTION = "frames_motion"
FRAMES_MOTION_SHAPE = "frames_motion_shape"

STATIC = "static"
PAN_LEFT = "pan_left"
PAN_RIGHT = "pan_right"
TILT_UP = "tilt_up"
TILT_DOWN = "tilt_down"
ZOOM_IN = "zoom_in"
ZOOM_OUT = "zoom_out"
COMPLEX = "complex"
CAMERA_MOTIONS = (STATIC, PAN_LEFT, PAN_RIGHT, TILT_UP, TILT_DOWN, ZOOM_IN, ZOOM_OUT, COMPLEX)

#: Sampling of the "motion" frame set: 4 frames per second, longer side at most 160 pixels.
SAMPLE_FPS = 4.0
SAMPLE_MAX_SIDE = 160

_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_GRID_POINTS = 32  # fit points along the longer side of the analysed region
_PHASE_MIN_RESPONSE = 0.15  # phase-correlation peak under which its global shift is not trusted
_PHASE_MIN_SHIFT = 2.0  # pixels; smaller shifts DIS finds unaided
_GOOD_MATCH = 0.9  # fraction of matched pixels above which a pair's unseeded flow is kept as it is
_IRLS_STEPS = 3


class MotionConfig(StageConfig):
    """Settings of the motion stage (speeds in frame diagonals per second, see the module docstring).

    Args:
        preset: DIS optical-flow preset: "medium" (default; about 2 ms per pair at 160x90 on one core),
            "fast" (about 8x cheaper, a little less accurate on large displacements) or "ultrafast".
        analysis_side: frames whose longer side exceeds this are downscaled to it before the flow (the
            stage's own frames already are), so that `flow_stats` on large frames costs the same.
        static_threshold: a clip (or pair) moving less than this is "static"; the default, 0.015 diagonals
            per second (a pan crossing the frame in about a minute), sits above the codec noise of a
            still shot at 4 samples per second and below slow but deliberate camera moves.
        min_fit: a pair whose global model has fewer than this fraction of inlier points is "complex"
            (independent motion of many things, noise, cuts, flashes).
        fit_tol: residual (frame diagonals per pair of samples, about 0.7 px at 160x90) under which a
            point is an inlier, plus a quarter of the model's flow at that point.
        min_dominance: the largest of translation, zoom and roll must hold at least this fraction of
            their total, else the pair is "complex" (e.g. a strong pan and zoom at once).
        min_agreement: the clip label must be the label of at least this fraction of its pairs, else
            the clip is "complex" (e.g. a pan left then right, or half still, half zooming).
        margin: fraction of the width/height ignored at each border, where content enters and leaves.
        match_tol: a point counts as an inlier only if frame b, warped back by the flow, matches frame a
            there within this many luma levels (0-255): flow that does not explain the
            pixels (noise, cuts, flashes, lost tracking) is not evidence of camera motion.
    """

    preset: Literal["ultrafast", "fast", "medium"] = "medium"
    analysis_side: int = Field(SAMPLE_MAX_SIDE, ge=32, le=1024)
    static_threshold: float = Field(0.015, ge=0)
    min_fit: float = Field(0.5, ge=0, le=1)
    fit_tol: float = Field(0.004, gt=0, le=0.5)
    min_dominance: float = Field(0.5, ge=0, le=1)
    min_agreement: float = Field(0.5, ge=0, le=1)
    margin: float = Field(0.08, ge=0, lt=0.4)
    match_tol: float = Field(20.0, gt=0, le=255)


def sample_interval(n_samples: int, clip_fps: float, sample_fps: float = SAMPLE_FPS,
                    total_frames: int | None = None) -> float:
    """Mean seconds between consecutive frames of an fps frame set, as the frames stage picks them.

    The frames stage takes every `max(clip_fps / sample_fps, 1)`-th frame (rounded), and the first and
    last frame when the clip is shorter than one step; `total_frames`, when known, covers that case.
    Does not know the exact indices: per-pair intervals differ from the mean by up to one source frame.
    """
    if clip_fps <= 0 or sample_fps <= 0:
        raise ValueError(f"clip_fps and sample_fps must be positive, got {clip_fps} and {sample_fps}")
    step = max(clip_fps / sample_fps, 1.0)  # source frames between samples
    if total_frames is not None and n_samples == 2 and total_frames - 1 < step:
        step = max(total_frames - 1, 1)
    return step / clip_fps


def _gray(frames: np.ndarray, side: int) -> list[np.ndarray]:
    """uint8 grayscale frames, downscaled (INTER_AREA) so the longer side is at most `side`."""
    h, w = frames.shape[1:3]
    scale = min(1.0, side / max(h, w))
    size = (max(8, int(round(w * scale))), max(8, int(round(h * scale))))
    out = []
    for f in frames:
        g = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY)
        out.append(g if scale == 1.0 else cv2.resize(g, size, interpolation=cv2.INTER_AREA))
    return out


def _warp_error(a: np.ndarray, b: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """|a - b warped back by flow| per pixel (float32 luma levels)."""
    h, w = a.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    back = cv2.remap(b, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.abs(a.astype(np.float32) - back.astype(np.float32))


def pair_flow(dis: cv2.DISOpticalFlow, a: np.ndarray, b: np.ndarray, match_tol: float,
              window: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense flow (h, w, 2) from gray frame a to b, and the per-pixel warp error (h, w).

    DIS alone loses track of displacements beyond about an eighth of the frame, so a global shift from
    phase correlation seeds it when that correlation is clear; if the seeded flow explains the pixels
    worse than an unseeded one would, the unseeded one is kept. Does not handle large rotations or zooms
    beyond what DIS tracks from a zero start.
    """
    if window is None:
        window = cv2.createHanningWindow((a.shape[1], a.shape[0]), cv2.CV_32F)
    plain = dis.calc(a, b, None)
    err = _warp_error(a, b, plain)
    if np.mean(err < match_tol) > _GOOD_MATCH:
        return plain, err
    (sx, sy), response = cv2.phaseCorrelate(a.astype(np.float32), b.astype(np.float32), window)
    if response < _PHASE_MIN_RESPONSE or math.hypot(sx, sy) < _PHASE_MIN_SHIFT:
        return plain, err
    seed = np.empty_like(plain)
    seed[..., 0], seed[..., 1] = sx, sy
    seeded = dis.calc(a, b, seed)
    seeded_err = _warp_error(a, b, seeded)
    return (seeded, seeded_err) if seeded_err.mean() < err.mean() else (plain, err)


def _fit_affine(pts: np.ndarray, flow: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Robust least-squares affine flow model; returns (params (3, 2), model flow at pts (m, 2)).

    `pts` (m, 2) are centred coordinates and `flow` (m, 2) the measured flow, both in frame diagonals;
    params map [x, y, 1] to (u, v). Cauchy weights with scale `tol` damp outliers (moving objects).
    """
    design = np.column_stack([pts, np.ones(len(pts), np.float64)])  # (m, 3)
    w = np.ones(len(pts))
    params = np.zeros((3, 2))
    for _ in range(_IRLS_STEPS):
        wd = design * w[:, None]
        # normal equations (3x3); the tiny ridge keeps a degenerate grid solvable
        params = np.linalg.solve(wd.T @ design + 1e-12 * np.eye(3), wd.T @ flow)
        diff = flow - design @ params
        res = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        scale = max(tol, 1.5 * float(np.median(res)))
        w = 1.0 / (1.0 + (res / scale) ** 2)
    return params, design @ params


def _pair_label(tx: float, ty: float, zoom: float, roll: float, min_dominance: float) -> str:
    """Label of a well-fitted, moving pair from its signed components (content motion, image axes)."""
    trans, z, r = math.hypot(tx, ty), abs(zoom), abs(roll)
    total = trans + z + r
    top = max(trans, z, r)
    if total <= 0 or top < min_dominance * total or top == r:
        return COMPLEX
    if top == z:
        return ZOOM_IN if zoom > 0 else ZOOM_OUT
    if abs(tx) >= abs(ty):
        return PAN_LEFT if tx > 0 else PAN_RIGHT  # content moving right = camera turning left
    return TILT_UP if ty > 0 else TILT_DOWN  # content moving down (image y grows down) = camera tilting up


def flow_stats(frames: np.ndarray, interval_s: float = 1.0 / SAMPLE_FPS,
               cfg: MotionConfig | None = None) -> dict[str, Any]:
    """Optical-flow statistics of RGB frames (n, h, w, 3) sampled `interval_s` seconds apart.

    Returns `motion_score` and `camera_motion` (see the module docstring) and, for inspection,
    `pairs` (n - 1), `speeds` (per-pair mean flow magnitude, diagonals/s), `camera_speed` (mean of the
    per-pair global model's flow magnitude, diagonals/s), `fit` (mean inlier fraction), `translation`
    ((x, y) mean content velocity, diagonals/s, image axes: +x right, +y down), `zoom` (mean divergence
    times mean distance from the centre, diagonals/s, > 0 = content grows), `roll` (likewise for curl,
    > 0 = content turns clockwise on screen) and `labels` (per pair). One frame gives a static result.
    Does not detect cuts: a cut inside the frames shows up as a "complex" pair with a large speed.
    """
    cfg = cfg or MotionConfig()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames shaped (n, h, w, 3) with n >= 1, got {frames.dtype} "
                         f"{frames.shape}")
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    gray = _gray(frames, cfg.analysis_side)
    h, w = gray[0].shape
    diag = math.hypot(w, h)
    # Fit grid: centred coordinates in diagonals, inside the margin.
    step = max(1, int(round(max(w, h) * (1 - 2 * cfg.margin) / _GRID_POINTS)))
    ys = np.arange(int(cfg.margin * h), h - int(cfg.margin * h), step)
    xs = np.arange(int(cfg.margin * w), w - int(cfg.margin * w), step)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    pts = np.column_stack([(gx.ravel() - (w - 1) / 2) / diag, (gy.ravel() - (h - 1) / 2) / diag])  # (m, 2)
    radius = float(np.linalg.norm(pts, axis=1).mean())

    dis = cv2.DISOpticalFlow_create(_PRESETS[cfg.preset])
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    speeds, cam_speeds, fits, comps, labels = [], [], [], [], []
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        flow, err = pair_flow(dis, a, b, cfg.match_tol, window)  # (h, w, 2) content displacement a -> b, px
        inner = flow[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
        speed = float(cv2.magnitude(inner[..., 0], inner[..., 1]).mean()) / diag / interval_s
        sample = flow[gy, gx].reshape(-1, 2).astype(np.float64) / diag  # (m, 2) diagonals per pair
        matched = err[gy, gx].ravel() < cfg.match_tol  # (m,) the flow explains the pixels there
        params, model = _fit_affine(pts, sample, cfg.fit_tol)
        res = np.hypot(*(sample - model).T)
        model_mag = np.hypot(*model.T)
        fit = float(np.mean(matched & (res < cfg.fit_tol + 0.25 * model_mag)))
        cam_speed = float(model_mag.mean()) / interval_s
        # params rows: d(u,v)/dx, d(u,v)/dy, (u,v) at the centre
        tx, ty = params[2] / interval_s
        div = (params[0, 0] + params[1, 1]) / 2 * radius / interval_s
        curl = (params[0, 1] - params[1, 0]) / 2 * radius / interval_s  # dv/dx - du/dy: clockwise on screen
        if speed < cfg.static_threshold:
            label = STATIC
        elif fit < cfg.min_fit:
            label = COMPLEX
        elif cam_speed < cfg.static_threshold:
            label = STATIC  # a still camera; something moves in front of it
        else:
            label = _pair_label(tx, ty, div, curl, cfg.min_dominance)
        speeds.append(speed)
        cam_speeds.append(cam_speed)
        fits.append(fit)
        comps.append((tx, ty, div, curl))
        labels.append(label)

    score = float(np.mean(speeds)) if speeds else 0.0
    camera = _clip_label(score, labels, cfg)
    mean = np.mean(comps, axis=0) if comps else np.zeros(4)
    return {
        MOTION_SCORE: score,
        CAMERA_MOTION: camera,
        "pairs": len(speeds),
        "speeds": speeds,
        "camera_speed": float(np.mean(cam_speeds)) if cam_speeds else 0.0,
        "fit": float(np.mean(fits)) if fits else 1.0,
        "translation": (float(mean[0]), float(mean[1])),
        "zoom": float(mean[2]),
        "roll": float(mean[3]),
        "labels": labels,
    }


def _clip_label(score: float, labels: list[str], cfg: MotionConfig) -> str:
    """The clip's camera_motion: the pairs' most common label if it holds `min_agreement` of them."""
    if score < cfg.static_threshold or not labels:
        return STATIC
    best = max(CAMERA_MOTIONS, key=labels.count)  # ties go to the earlier name in CAMERA_MOTIONS
    return best if labels.count(best) >= cfg.min_agreement * len(labels) else COMPLEX


class Motion(RowStage):
    """Per-clip motion score and camera-motion label from DIS optical flow on the "motion" frame set.

    CPU only (OpenCV); about 2-3 ms per pair of samples at the default preset. Needs the clip's `fps` to
    turn displacements into speeds. Does not separate camera from object motion in `motion_score`, does
    not detect cuts, and does not decide what is kept.
    """

    name: ClassVar[str] = "motion"
    Config: ClassVar[type[StageConfig]] = MotionConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = (FRAMES_MOTION, FRAMES_MOTION_SHAPE, "fps")
    adds: ClassVar[dict[str, pa.DataType]] = {MOTION_SCORE: pa.float32(), CAMERA_MOTION: pa.string()}
    drops: ClassVar[tuple[str, ...]] = (FRAMES_MOTION, FRAMES_MOTION_SHAPE)
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = (FrameSpec("motion", fps=SAMPLE_FPS, max_side=SAMPLE_MAX_SIDE),)
    batch_size: ClassVar[int] = 8

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        blob, shape = row.get(FRAMES_MOTION), row.get(FRAMES_MOTION_SHAPE)
        if blob is None or shape is None:
            raise ValueError(f"row has no {FRAMES_MOTION} (put the frames stage before motion in the recipe)")
        fps = row.get("fps")
        if not fps or fps <= 0:
            raise ValueError(f"row has no usable fps ({fps!r}); the split stage sets it")
        frames = unpack_frames(blob, shape)
        total = row.get("clip_n_frames")  # (`n_frames` in a work row may be the whole video's count)
        if total is None and row.get("end_frame") is not None and row.get("start_frame") is not None:
            total = int(row["end_frame"]) - int(row["start_frame"])
        interval = sample_interval(len(frames), float(fps), SAMPLE_FPS, total)
        stats = flow_stats(frames, interval, self.cfg)  # type: ignore[arg-type]
        log.debug("motion %s: score %.4f, camera %s, fit %.2f, pair labels %s", row.get("uri"),
                  stats[MOTION_SCORE], stats[CAMERA_MOTION], stats["fit"], stats["labels"])
        out = {k: v for k, v in row.items() if k not in self.drops}
        out[MOTION_SCORE] = stats[MOTION_SCORE]
        out[CAMERA_MOTION] = stats[CAMERA_MOTION]
        return out
