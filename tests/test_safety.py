"""Safety stage on real decoded frames.

There are no explicit test images in this repository and there will not be: we cannot ship or generate them.
So these tests do not measure recall on nudity. They check that ordinary footage and textures score low, that
the whole code path runs on frames decoded the way the frames stage decodes them, that our pre-processing is
NudeNet's (apart from its documented channel swap), that `nsfw_score` is exactly the max of the counted class
confidences our post-processing returns from the detector's raw output, and that those agree with NudeNet's
own post-processing of the same output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill.stages.base import FrameSpec
from clipmill.stages.frames import decode_sets
from clipmill.stages.safety import (
    DEFAULT_CLASSES,
    FRAME_SET,
    NUDENET_LABELS,
    Safety,
    SafetyConfig,
    class_confidences,
    preprocess,
)

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def needs(name: str) -> Path:
    path = TESTDATA / name
    if not path.is_file():
        pytest.skip(f"shared test video {path} not found (the shared videos sit beside the repository in ../shared)")
    return path


def safety_frames(name: str, n: int = FRAME_SET.n) -> np.ndarray:
    """The "safety" frame set of a shared test video (or n frames of it), decoded as the frames stage does."""
    spec = FrameSpec(FRAME_SET.name, n=n, max_side=FRAME_SET.max_side)
    sets, _ = decode_sets(needs(name).read_bytes(), [spec], 64)
    return sets[spec.name]


def row(frames: np.ndarray, uri: str = "mem://clip") -> dict:
    return {"uri": uri, "clip_index": 0, "frames_safety": np.ascontiguousarray(frames).tobytes(),
            "frames_safety_shape": list(frames.shape), "error": None}


@pytest.fixture(scope="module")
def safety() -> Safety:
    return Safety()


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4", "fades.mp4", "testvideo.mp4"])
def test_ordinary_footage_scores_low(safety, name):
    got = safety.process(row(safety_frames(name)))
    assert got["nsfw_score"] < 0.3, (name, got["nsfw_score"])


def test_textures_score_low(safety):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 180, 320, 3), dtype=np.uint8)
    flat = np.full((1, 180, 320, 3), (200, 160, 140), np.uint8)  # a skin-like flat colour
    grad = np.broadcast_to(np.linspace(0, 255, 320, dtype=np.uint8)[None, None, :, None], (1, 180, 320, 3))
    got = safety.process(row(np.concatenate([noise, flat, grad])))
    assert 0.0 <= got["nsfw_score"] < 0.2, got["nsfw_score"]


def test_preprocessing_matches_nudenet():
    """Same padding, resize and scaling as NudeNet's `_read_image`, which passes channels through in order."""
    from nudenet import nudenet as nn

    for frame in (safety_frames("bikes.mp4")[0], np.random.default_rng(1).integers(0, 256, (200, 90, 3), np.uint8)):
        ours = preprocess(frame, 320)
        theirs = nn._read_image(np.ascontiguousarray(frame), 320)[0][0]
        assert ours.shape == theirs.shape == (3, 320, 320)
        assert np.abs(ours - theirs).max() <= 1.5 / 255, np.abs(ours - theirs).max()


def test_score_is_max_of_counted_confidences_on_real_frames(safety):
    """On real frames: nsfw_score == max over frames of the counted classes' confidences from the raw output,
    and it agrees with NudeNet's own post-processing (boxes >= 0.2, NMS) of that output.

    The Big Buck Bunny excerpt, 8 frames, is used because the detector fires on one of them (a known false
    positive, see the module docstring), so NudeNet's post-processing has counted detections to compare with.
    """
    from nudenet import nudenet as nn

    frames = safety_frames("bigbuckbunny.mp4", n=8)
    raw = safety.detector_output(list(frames))
    assert raw.shape == (len(frames), 4 + len(NUDENET_LABELS), 2100)
    conf = class_confidences(raw)  # (frames, classes)
    counted = [NUDENET_LABELS.index(c) for c in DEFAULT_CLASSES]
    expected = float(conf[:, counted].max())
    assert conf[:, counted].max() == pytest.approx(raw[:, [4 + i for i in counted], :].max())
    got = Safety(SafetyConfig(max_frames=8)).process(row(frames))  # all 8 frames (the default reads 4)
    assert got["nsfw_score"] == pytest.approx(expected, abs=1e-6)

    h, w = frames.shape[1:3]
    reported = []
    for i in range(len(frames)):
        dets = nn._postprocess([raw[i:i + 1]], max(h, w) - w, max(h, w) - h, 1, 1, w, h, 320, 320)
        ours = {name: float(conf[i, k]) for k, name in enumerate(NUDENET_LABELS)}
        for d in dets:  # every NudeNet detection's score is at most our confidence for its class
            assert d["score"] <= ours[d["class"]] + 1e-6, (d, ours[d["class"]])
        reported += [d["score"] for d in dets if d["class"] in DEFAULT_CLASSES]
    assert reported, "expected NudeNet to report a counted detection on this excerpt"
    assert got["nsfw_score"] == pytest.approx(max(reported), abs=1e-6)


def test_classes_change_the_score(safety):
    frames = safety_frames("carphone_pristine.mp4")  # a face in close-up
    faces = Safety(SafetyConfig(classes=("FACE_FEMALE", "FACE_MALE"))).process(row(frames))["nsfw_score"]
    default = safety.process(row(frames))["nsfw_score"]
    assert faces > 0.5 > default, (faces, default)


def test_batch_matches_rows_and_bad_rows_become_errors(safety):
    rows = [row(safety_frames("bikes.mp4"), "a"), row(safety_frames("bigbuckbunny.mp4")[:2], "b")]
    batched = safety(pa.Table.from_pylist(rows))  # two live rows: one process_many call
    assert batched.schema.field("nsfw_score").type == pa.float32()
    for r, o in zip(rows, batched.to_pylist(), strict=True):
        assert o["error"] is None
        assert o["nsfw_score"] == pytest.approx(safety.process(r)["nsfw_score"], abs=1e-5)
    bad = dict(rows[0], uri="bad", frames_safety_shape=[4, 180, 321, 3])
    out = safety(pa.Table.from_pylist([rows[0], bad])).to_pylist()
    assert out[0]["error"] is None and out[0]["nsfw_score"] is not None
    assert out[1]["error"].startswith("safety: ValueError") and out[1]["nsfw_score"] is None
    missing = safety(pa.Table.from_pylist([{"uri": "x", "clip_index": 0, "error": None}])).to_pylist()[0]
    assert "frames stage" in missing["error"]


def test_model_is_loaded_once(monkeypatch):
    import onnxruntime

    made = []
    real = onnxruntime.InferenceSession

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    stage = Safety(SafetyConfig(max_frames=1))
    assert len(made) == 1
    frames = np.random.default_rng(2).integers(0, 256, (4, 180, 320, 3), np.uint8)
    stage(pa.Table.from_pylist([row(frames, f"r{i}") for i in range(3)]))
    stage.process(row(frames))
    assert len(made) == 1


def test_config_is_validated():
    with pytest.raises(ValidationError, match="FEMALE_BREAST_EXPOSED"):
        SafetyConfig(classes=("BREASTS",))
    with pytest.raises(ValidationError):
        SafetyConfig(classes=())
    with pytest.raises(ValidationError):
        SafetyConfig(frames=4)  # unknown key
    with pytest.raises(FileNotFoundError, match="model_path"):
        Safety(SafetyConfig(model_path="/nonexistent/model.onnx"))
    assert Safety.frame_sets == (FRAME_SET,) and Safety.reads == ("frames_safety", "frames_safety_shape")
    assert Safety.adds == {"nsfw_score": pa.float32()}
