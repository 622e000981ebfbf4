"""A clip's measured facts, its dominant colours, and the offline "metadata" caption written from them.

Facts come from columns earlier stages measured (duration, size, camera motion, motion score, OCR text,
brightness, the manifest's source caption) and from the decoded frames (dominant colours, mean luma).
They feed both the VLM prompt (so a model can use them) and the offline caption (`caption_model =
"clipmill/metadata"`), which says only what was measured: it does not know what is in the picture beyond
colours and text, and says so by naming its source ("A video clip", or the source caption).

Dominant colours: every frame is shrunk to at most 48x48 pixels, each pixel is named by the nearest colour
of `PALETTE` in CIE Lab (OpenCV's 8-bit Lab), and the names covering at least `MIN_SHARE` (10%) of the
pixels of all frames, most common first, at most 3, are the clip's colours. The palette (sRGB):

    black (20,20,20)  grey (128,128,128)  white (235,235,235)  red (200,30,35)  orange (235,130,30)
    yellow (235,215,50)  green (50,150,60)  teal (30,140,140)  blue (40,80,200)  purple (120,50,160)
    pink (235,140,180)  brown (125,80,45)  beige (210,190,150)  sky blue (120,180,230)

It is a naming convention, not a colour science claim: mid-tones between two anchors go to the nearer one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "grey": (128, 128, 128), "white": (235, 235, 235), "red": (200, 30, 35),
    "orange": (235, 130, 30), "yellow": (235, 215, 50), "green": (50, 150, 60), "teal": (30, 140, 140),
    "blue": (40, 80, 200), "purple": (120, 50, 160), "pink": (235, 140, 180), "brown": (125, 80, 45),
    "beige": (210, 190, 150), "sky blue": (120, 180, 230),
}
MIN_SHARE = 0.10
MAX_COLOURS = 3
_SIDE = 48

CAMERA_PHRASES = {
    "static": "the camera is static", "pan_left": "the camera pans left", "pan_right": "the camera pans right",
    "tilt_up": "the camera tilts up", "tilt_down": "the camera tilts down", "zoom_in": "the camera zooms in",
    "zoom_out": "the camera zooms out", "complex": "the camera moves freely",
}

METADATA_MODEL = "clipmill/metadata"


def _lab(rgb: np.ndarray) -> np.ndarray:
    import cv2  # noqa: PLC0415

    return cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)


_PALETTE_LAB: np.ndarray | None = None


def dominant_colours(frames: list[np.ndarray] | np.ndarray, *, min_share: float = MIN_SHARE,
                     limit: int = MAX_COLOURS) -> list[tuple[str, float]]:
    """(palette name, share of pixels) of the dominant colours of RGB uint8 frames, most common first."""
    import cv2  # noqa: PLC0415

    global _PALETTE_LAB
    if _PALETTE_LAB is None:
        _PALETTE_LAB = _lab(np.array(list(PALETTE.values()), np.uint8))
    pix = []
    for f in frames:
        h, w = f.shape[:2]
        s = min(1.0, _SIDE / max(h, w))
        small = cv2.resize(np.ascontiguousarray(f), (max(1, round(w * s)), max(1, round(h * s))),
                           interpolation=cv2.INTER_AREA)
        pix.append(small.reshape(-1, 3))
    if not pix:
        return []
    lab = _lab(np.concatenate(pix))
    d = ((lab[:, None, :] - _PALETTE_LAB[None, :, :]) ** 2).sum(-1)
    counts = np.bincount(d.argmin(1), minlength=len(PALETTE)) / len(lab)
    names = list(PALETTE)
    order = np.argsort(-counts, kind="stable")
    return [(names[i], float(counts[i])) for i in order if counts[i] >= min_share][:limit]


def mean_luma(frames: list[np.ndarray] | np.ndarray) -> float | None:
    """Mean Rec.601 luma (0-255) of RGB frames, or None without frames."""
    if len(frames) == 0:
        return None
    vals = [float((f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114).mean()) for f in frames]
    return sum(vals) / len(vals)


@dataclass
class ClipFacts:
    """What was measured about a clip (None = not measured)."""

    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = None
    camera_motion: str | None = None
    motion_score: float | None = None
    ocr_text: str | None = None
    source_caption: str | None = None
    brightness: float | None = None
    colours: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The facts as short "- name: value" lines (for a model prompt)."""
        out = []
        if self.duration_s:
            out.append(f"- duration: {self.duration_s:.1f} seconds")
        if self.aspect:
            out.append(f"- aspect ratio: {self.aspect}")
        if self.camera_motion:
            out.append(f"- camera motion (from optical flow): {self.camera_motion.replace('_', ' ')}")
        if self.motion_score is not None:
            out.append(f"- amount of motion: {motion_words(self.motion_score)}")
        if self.colours:
            out.append(f"- dominant colours: {', '.join(self.colours)}")
        if self.brightness is not None:
            out.append(f"- exposure: {lighting_words(self.brightness)}")
        if self.ocr_text:
            out.append(f"- on-screen text (OCR): \"{_one_line(self.ocr_text, 200)}\"")
        if self.source_caption:
            out.append(f"- original caption (may be inaccurate): \"{_one_line(self.source_caption, 300)}\"")
        return out


def _one_line(text: str, limit: int) -> str:
    t = re.sub(r"\s+", " ", text).strip()
    return t if len(t) <= limit else t[: limit - 3].rstrip() + "..."


def motion_words(score: float) -> str:
    """Words for a motion_score (frame diagonals per second; see stages/motion.py)."""
    if score < 0.005:
        return "almost no motion"
    if score < 0.03:
        return "gentle motion"
    if score < 0.1:
        return "moderate motion"
    return "fast motion"


def lighting_words(luma: float) -> str:
    """Words for a mean luma (0-255)."""
    if luma < 60:
        return "dark, low-key"
    if luma > 180:
        return "bright, high-key"
    return "balanced"


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def clip_facts(row: dict[str, Any], frames: list[np.ndarray] | None = None) -> ClipFacts:
    """Facts of a clip from a work row (pipeline) or a committed clip row (re-captioning), plus its frames.

    Work rows carry the clip's own duration/size in `clip_duration_s`/`clip_width`/`clip_height` (their
    `duration_s`/`width`/`height` are the source video's); committed rows carry them in the plain names.
    """
    from clipmill.storage.schema import aspect_bucket  # noqa: PLC0415

    dur = _num(row.get("clip_duration_s"))
    if dur is None and row.get("end_s") is not None and row.get("start_s") is not None:
        dur = _num(row["end_s"]) - _num(row["start_s"])  # type: ignore[operator]
    if dur is None:
        dur = _num(row.get("duration_s"))
    w = row.get("clip_width") or row.get("width")
    h = row.get("clip_height") or row.get("height")
    if frames is not None and len(frames) and not (w and h):
        h, w = frames[0].shape[:2]
    if frames is not None and len(frames):
        colours = [n for n, _ in dominant_colours(frames)]
    else:
        colours = list(row.get("dominant_colors") or [])
    bright = mean_luma(frames) if frames is not None and len(frames) else _num(row.get("brightness"))
    return ClipFacts(
        duration_s=dur, width=int(w) if w else None, height=int(h) if h else None,
        aspect=aspect_bucket(int(w), int(h)) if w and h else None,
        camera_motion=row.get("camera_motion") or None, motion_score=_num(row.get("motion_score")),
        ocr_text=(row.get("ocr_text") or None), source_caption=(row.get("source_caption") or "").strip() or None,
        brightness=bright, colours=colours,
    )


def _sentence(text: str) -> str:
    t = _one_line(text, 400)
    if not t:
        return t
    t = t[0].upper() + t[1:]
    return t if t[-1] in ".!?\"'" else t + "."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(subject: str | None, facts: ClipFacts) -> str:
    """A dense caption in clipmill's fixed structure: subject sentence, then the measured facts as sentences.

    The same structure serves the metadata captions of training clips and the template expansion of a user's
    prompt at sampling time, so both sides of the model see one kind of text.
    """
    parts = [_sentence(subject) if subject else "A video clip."]
    shot = []
    if facts.duration_s:
        shot.append(f"{facts.duration_s:.1f}-second")
    if facts.aspect and facts.aspect != "unknown":
        shot.append(facts.aspect)
    if shot:
        parts.append(f"A {' '.join(shot)} shot.")
    motion = []
    if facts.camera_motion in CAMERA_PHRASES:
        motion.append(CAMERA_PHRASES[facts.camera_motion])
    if facts.motion_score is not None:
        motion.append(f"with {motion_words(facts.motion_score)} in the frame")
    if motion:
        parts.append(_sentence(" ".join(motion)))
    look = []
    if facts.colours:
        look.append(f"dominant colours are {_and(facts.colours)}")
    if facts.brightness is not None:
        look.append(f"{lighting_words(facts.brightness)} lighting")
    if look:
        parts.append(_sentence("; ".join(look)))
    if facts.ocr_text:
        parts.append(f"On-screen text reads \"{_one_line(facts.ocr_text, 160)}\".")
    return " ".join(parts)


def metadata_caption(facts: ClipFacts) -> str:
    """The offline caption of a clip: its source caption (or "A video clip") followed by its measured facts."""
    return describe(facts.source_caption, facts)
