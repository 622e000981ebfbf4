"""A toy text-to-video world with a classical detector: coloured shapes moving in four directions.

`make_toy_set` writes small MP4s (PyAV) of one filled circle or square of a named colour on a grey
background, moving left, right, up or down, plus a `manifest.jsonl` (uri + caption) that `clipmill run`
reads as `source_caption`. `detect` measures a generated video without any model: the colour is the
nearest named hue of the pixels that differ from the background, the direction is the sign of the
dominant axis of the centroid's trajectory. Used by bench/toy_t2v.py and the tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPES = ("circle", "square")
BACKGROUND = (110, 110, 110)
# colour/direction pairs never shown in training (a Latin square: each colour and direction once)
HELD_OUT = (("red", "up"), ("green", "down"), ("blue", "left"), ("yellow", "right"))


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def render(color: str, direction: str, shape: str = "circle", *, size: int = 64, frames: int = 24,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (frames, size, size, 3): the shape crossing the frame along `direction` at constant speed."""
    rng = rng or np.random.default_rng(0)
    radius = size * rng.uniform(0.18, 0.22)  # big enough that the object, not the background, dominates the loss
    dx, dy = DIRECTIONS[direction]
    travel = size - 2 * radius - 4  # along the motion axis, from one side to the other
    across = rng.uniform(radius + 2, size - radius - 2)  # position on the other axis
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        s = radius + 2 + travel * i / max(1, frames - 1)
        along = s if (dx + dy) > 0 else size - s
        cx, cy = (along, across) if dx else (across, along)
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        else:
            inside = (np.abs(xx - cx) <= radius * 0.9) & (np.abs(yy - cy) <= radius * 0.9)
        frame = np.empty((size, size, 3), np.uint8)
        frame[:] = BACKGROUND
        frame[inside] = COLORS[color]
        out[i] = frame
    return out


def make_toy_set(folder: str | Path, per_pair: int = 4, *, size: int = 64, frames: int = 24, fps: float = 8.0,
                 seed: int = 0, include_held_out: bool = False) -> list[dict]:
    """Write per_pair videos for every colour/direction pair (minus HELD_OUT unless asked) and manifest.jsonl.

    Returns the manifest rows (uri, caption, color, direction, shape).
    """
    from clipmill.synth import write_video  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for color in COLORS:
        for direction in DIRECTIONS:
            if (color, direction) in HELD_OUT and not include_held_out:
                continue
            for k in range(per_pair):
                shape = SHAPES[k % len(SHAPES)]
                path = folder / f"{color}_{direction}_{k}.mp4"
                write_video(path, render(color, direction, shape, size=size, frames=frames, rng=rng), fps)
                rows.append({"uri": path.name, "caption": caption(color, shape, direction), "color": color,
                             "direction": direction, "shape": shape})
    with open(folder / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def _hue(rgb: np.ndarray) -> float:
    """Hue in degrees of one RGB colour."""
    r, g, b = (float(v) for v in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx - mn < 1e-6:
        return float("nan")
    if mx == r:
        h = (g - b) / (mx - mn) % 6
    elif mx == g:
        h = (b - r) / (mx - mn) + 2
    else:
        h = (r - g) / (mx - mn) + 4
    return 60.0 * h


def detect(video: np.ndarray, threshold: float = 60.0) -> dict:
    """Colour and direction of the moving object in uint8 (T, H, W, 3) frames.

    Foreground = pixels farther than `threshold` (RGB distance) from the background (median of the border).
    Returns {"color": name | None, "direction": name | None, "hue": degrees, "motion": (dx, dy) per frame}.
    """
    video = video.astype(np.float32)
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1).reshape(-1, 3)
    background = np.median(border, axis=0)
    fg = np.linalg.norm(video - background, axis=-1) > threshold  # (T, H, W)
    result = {"color": None, "direction": None, "hue": float("nan"), "motion": (0.0, 0.0)}
    if fg.sum() < 4:
        return result
    hue = _hue(video[fg].mean(0))
    if math.isfinite(hue):
        result["hue"] = hue
        dist = {name: min(abs(hue - _hue(np.array(c))), 360 - abs(hue - _hue(np.array(c)))) for name, c in COLORS.items()}
        result["color"] = min(dist, key=dist.get)
    ts, xs, ys = [], [], []
    yy, xx = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    for t in range(video.shape[0]):
        if fg[t].sum() >= 2:
            ts.append(t)
            xs.append(xx[fg[t]].mean())
            ys.append(yy[fg[t]].mean())
    if len(ts) >= 2:
        vx, vy = np.polyfit(ts, xs, 1)[0], np.polyfit(ts, ys, 1)[0]
        result["motion"] = (float(vx), float(vy))
        if max(abs(vx), abs(vy)) > 0.05:
            result["direction"] = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    return result
