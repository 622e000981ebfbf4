"""Embedding stage on real decoded video: near-duplicates (re-encoded, rescaled, cropped, brightened) score
clearly higher than different scenes; vectors are unit-norm float32 of a fixed size."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest

from clipmill import synth
from clipmill.stages.embedding import DIM, MODEL_NAME, Embedding, perceptual_embedding
from clipmill.stages.frames import Frames

W, H = 320, 180


def _frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _crop(frame: np.ndarray, frac: float = 0.04) -> np.ndarray:
    h, w = frame.shape[:2]
    a, b = int(round(h * frac)), int(round(w * frac))
    return np.ascontiguousarray(frame[a:h - a, b:w - b])


VARIANTS = {  # name: (per-frame transform, encoder options)
    "crf38": (lambda f: f, {"crf": "38", "preset": "veryfast"}),
    "half": (lambda f: cv2.resize(f, (W // 2, H // 2), interpolation=cv2.INTER_AREA), None),
    "crop4": (_crop, None),
    "brighter": (lambda f: np.clip(f.astype(np.int16) + 20, 0, 255).astype(np.uint8), None),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Five different scenes (seeds 1-5, panning camera) and four altered copies of scenes 1 and 2."""
    d = tmp_path_factory.mktemp("embedding_inputs")
    out = {}
    for seed in range(1, 6):
        out[f"scene{seed}"] = d / f"scene{seed}.mp4"
        synth.make_shots_video(out[f"scene{seed}"], [synth.Shot(40, "pan")], width=W, height=H, seed=seed)
    for seed in (1, 2):
        src = _frames_of(out[f"scene{seed}"])
        for name, (fn, options) in VARIANTS.items():
            out[f"scene{seed}_{name}"] = d / f"scene{seed}_{name}.mp4"
            synth.write_video(out[f"scene{seed}_{name}"], [fn(f) for f in src], 25, options=options)
    return out


def embed_files(paths: dict[str, Path]) -> dict[str, dict]:
    """Rows of the embedding stage for MP4 files, decoded by the frames stage at its defaults."""
    table = pa.table({"uri": [str(p) for p in paths.values()], "clip_index": [0] * len(paths),
                      "media": [p.read_bytes() for p in paths.values()]})
    out = Embedding()(Frames()(table))
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    return dict(zip(paths, out.to_pylist(), strict=True))


def test_near_duplicates_close_and_scenes_apart(videos):
    rows = embed_files(videos)
    vec = {k: np.asarray(r["embedding"], np.float64) for k, r in rows.items()}
    for k, r in rows.items():
        assert r["error"] is None, (k, r["error"])
        assert r["embedding_model"] == MODEL_NAME and len(r["embedding"]) == DIM
        assert np.linalg.norm(vec[k]) == pytest.approx(1.0, abs=1e-5)
    same = {f"scene{s}~{v}": float(vec[f"scene{s}"] @ vec[f"scene{s}_{v}"]) for s in (1, 2) for v in VARIANTS}
    scenes = [f"scene{s}" for s in range(1, 6)]
    diff = {f"{a}~{b}": float(vec[a] @ vec[b]) for a, b in itertools.combinations(scenes, 2)}
    report = (f"near-duplicate cosines {({k: round(v, 3) for k, v in same.items()})}; "
              f"different-scene cosines {({k: round(v, 3) for k, v in diff.items()})}")
    assert min(same.values()) > 0.8, report
    assert max(diff.values()) < 0.6, report
    assert min(same.values()) - max(diff.values()) > 0.3, report


def test_rows_without_frames_become_errors():
    table = pa.table({"clip_index": [0], "frames": pa.array([None], pa.binary()),
                      "frames_shape": pa.array([None], pa.list_(pa.int32())), "error": pa.array([None], pa.string())})
    row = Embedding()(table).to_pylist()[0]
    assert row["error"].startswith("embedding: ValueError") and row["embedding"] is None


def test_single_and_flat_frames():
    rng = np.random.default_rng(0)
    one = cv2.GaussianBlur(rng.integers(0, 256, (1, 72, 128, 3), dtype=np.uint8)[0], (0, 0), 3)[None]
    vec = perceptual_embedding(one)
    assert vec.dtype == np.float32 and vec.shape == (DIM,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    black = perceptual_embedding(np.zeros((4, 36, 64, 3), np.uint8))
    assert np.all(np.isfinite(black)) and np.linalg.norm(black) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        perceptual_embedding(np.zeros((0, 36, 64, 3), np.uint8))
