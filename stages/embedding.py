"""Embedding stage: a compact perceptual clip embedding that needs no model weights.

One row per clip (level "clip"). Reads the default frame set (`frames`, `frames_shape`: 8 frames at 256,
see stages/frames.py) and adds:

* `embedding`: a 106-d float32 vector of unit L2 norm. Cosine similarity (a dot product) near 1 means
  the same footage; use it for near-duplicate detection and "more like this" search. It is not
  semantic: two different beach scenes are as far apart as a beach and a street.
* `embedding_model`: "clipmill/perceptual-dct-v1" (compare embeddings only between rows with the same
  value; the aesthetics stage writes CLIP embeddings under another name into the same columns, and
  replaces these when both run).

How: each sampled frame is converted to YCrCb. Luma is resized to 32x32 (area averaging, so the clip's
resolution and aspect do not matter) and its 2-D DCT taken; the 35 lowest-frequency AC coefficients
(0 < u + v <= 7; the DC term, i.e. mean brightness, is dropped) are weighted by their frequency
sqrt(u^2 + v^2), which flattens the 1/f spectrum of natural images so that a few coarse terms do not
dominate, and divided by their norm, which cancels brightness offsets and contrast gains. Chroma (Cr and
Cb less 128) is resized to 8x8 and its 9 lowest AC DCT coefficients per channel (0 < u + v <= 3) give the
colour layout, divided by the luma spread so that a brightness gain cancels there too (the mean colour
is left out: it is too few numbers to tell scenes apart and made unrelated scenes look alike). Per-frame
vectors (53 numbers) are averaged over the first and the second half of the sample (a coarse view of how
the clip evolves), concatenated (106 numbers) and L2-normalised.

Measured on synthetic 320x180 clips decoded by the frames stage (tests/test_embedding.py): a clip
against its re-encoded (crf 38), half-size, 4%-cropped (each side) or brightened copy scores 0.89-1.0;
unrelated scenes at most about 0.4 (typically 0 +- 0.15). Low frequencies only, so it is robust to
codec noise and scaling, but larger crops, flips, letterboxing and big overlays move it a lot, and
temporal order is only seen in halves.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa

from clipmill.stages.base import RowStage, StageConfig
from clipmill.stages.framesets import unpack_frames

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
EMBEDDING_MODEL = "embedding_model"
MODEL_NAME = "clipmill/perceptual-dct-v1"

LUMA_SIDE = 32  # luma is resized to LUMA_SIDE x LUMA_SIDE before its DCT
LUMA_UV = [(u, v) for u in range(8) for v in range(8) if 0 < u + v <= 7]  # 35 low-frequency AC terms
LUMA_WEIGHT = np.array([np.hypot(u, v) for u, v in LUMA_UV], np.float32)  # flattens the 1/f spectrum
CHROMA_SIDE = 8
CHROMA_UV = [(u, v) for u in range(4) for v in range(4) if 0 < u + v <= 3]  # 9 coarse colour-layout terms
CHROMA_WEIGHT = 1.0  # weight of the colour part against the (unit-norm) luma part
SEGMENTS = 2  # the sample is averaged over this many consecutive parts (first half, second half)
DIM = SEGMENTS * (len(LUMA_UV) + 2 * len(CHROMA_UV))  # 106


class EmbeddingConfig(StageConfig):
    """The embedding stage has no settings: its vectors must stay comparable across runs and recipes."""


def frame_features(frame: np.ndarray) -> np.ndarray:
    """Perceptual features of one RGB uint8 frame (h, w, 3): unit-norm luma DCT terms, then colour terms."""
    small = cv2.resize(frame, (LUMA_SIDE, LUMA_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    ycc = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)  # linear, so resizing first is the same up to rounding
    d = cv2.dct(np.ascontiguousarray(ycc[..., 0]))
    luma = np.array([d[u, v] for u, v in LUMA_UV], np.float32) * LUMA_WEIGHT
    norm = float(np.linalg.norm(luma))
    luma = luma / norm if norm > 1e-3 else np.zeros_like(luma)  # a flat frame has no luma layout
    # OpenCV centres float chroma on 0.5 (its delta for float images); Cr, Cb are then signed, 0-255 scale
    chroma_small = cv2.resize(ycc[..., 1:] - 0.5, (CHROMA_SIDE, CHROMA_SIDE), interpolation=cv2.INTER_AREA)
    spread = float(ycc[..., 0].std()) + 10.0  # a brightness gain scales chroma and luma spread alike
    chroma = []
    for c in range(2):
        dc = cv2.dct(np.ascontiguousarray(chroma_small[..., c]))
        chroma += [dc[u, v] for u, v in CHROMA_UV]
    chroma_vec = CHROMA_WEIGHT * np.array(chroma, np.float32) / (CHROMA_SIDE * spread)
    return np.concatenate([luma, chroma_vec])


def perceptual_embedding(frames: np.ndarray) -> np.ndarray:
    """The DIM-d unit-norm float32 embedding of a clip's sampled RGB frames (n, h, w, 3), n >= 1."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames shaped (n, h, w, 3) with n >= 1, got {frames.shape}")
    per_frame = np.stack([frame_features(f) for f in frames])  # (n, F)
    n = len(per_frame)
    bounds = [(i * n // SEGMENTS, max((i + 1) * n // SEGMENTS, i * n // SEGMENTS + 1)) for i in range(SEGMENTS)]
    parts = [per_frame[a:b] for a, b in bounds]  # a 1-frame clip uses its frame in every part
    vec = np.concatenate([p.mean(axis=0) for p in parts]).astype(np.float32)
    norm = float(np.linalg.norm(vec))
    if norm < 1e-6:  # flat frames (all black): no structure; a fixed unit vector keeps them comparable
        vec = np.zeros(DIM, np.float32)
        vec[0] = 1.0
        return vec
    return vec / norm


class Embedding(RowStage):
    """Weight-free perceptual embedding of each clip (low-frequency luma DCT + colour layout over time).

    Pure NumPy/OpenCV on the frames stage's default sample; about a millisecond per clip. Keeps the
    frames for later stages and decides nothing.
    """

    name: ClassVar[str] = "embedding"
    Config: ClassVar[type[StageConfig]] = EmbeddingConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ("frames", "frames_shape")
    adds: ClassVar[dict[str, pa.DataType]] = {
        EMBEDDING: pa.list_(pa.float32()),
        EMBEDDING_MODEL: pa.string(),
    }
    batch_size: ClassVar[int] = 16

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        blob, shape = row.get("frames"), row.get("frames_shape")
        if blob is None or shape is None:
            raise ValueError("row has no frames (run the frames stage first)")
        vec = perceptual_embedding(unpack_frames(blob, shape))
        return dict(row, **{EMBEDDING: vec.tolist(), EMBEDDING_MODEL: MODEL_NAME})
