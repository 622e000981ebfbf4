"""Frames and quality stages on real decoded clips: sampling, thumbnails and the basic quality scores."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill import badfiles
from clipmill.stages.frames import Frames, FramesConfig, sample_indices
from clipmill.stages.framesets import unpack_frames
from clipmill.stages.quality import Quality, QualityConfig, quality_scores
from clipmill.stages.transcode import Transcode

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def clip_rows(path: Path, spans: list[tuple[int, int]] | None = None) -> pa.Table:
    """Work rows for clips of `path` (default: one clip of the whole video), as the split stage makes them."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = [f.pts for f in c.decode(s)]
        tb, fps = str(s.time_base), float(s.average_rate)
    spans = spans or [(0, len(pts))]
    return pa.Table.from_pylist([
        {"uri": str(path), "clip_index": i, "start_frame": a, "end_frame": b, "start_pts": pts[a],
         "end_pts": pts[b] if b < len(pts) else None, "time_base": tb, "fps": fps}
        for i, (a, b) in enumerate(spans)])


def run_chain(path: Path, spans=None, frames_cfg: FramesConfig | None = None) -> list[dict]:
    """Transcode -> frames -> quality, each called on the batch the way the runner calls it."""
    batch = Transcode()(clip_rows(path, spans))
    batch = Frames(frames_cfg)(batch)
    return Quality()(batch).to_pylist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quality_inputs")
    rng = np.random.default_rng(0)
    still = np.clip(rng.normal(120, 40, (96, 160, 3)), 0, 255).astype(np.uint8)
    still = cv2.GaussianBlur(still, (3, 3), 0)
    return {
        "moving": badfiles.make_valid(d, name="moving.mp4", n=40),
        "black": badfiles.encode_video(d / "black.mp4", np.zeros((24, 96, 160, 3), np.uint8), 24),
        "static": badfiles.encode_video(d / "static.mp4", np.repeat(still[None], 30, axis=0), 24),
        "short": badfiles.make_very_short(d),
    }


# ---------------------------------------------------------------------------------------------- frames


def test_sample_indices():
    assert sample_indices(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(9, 1) == [4]
    assert sample_indices(0, 8) == []


def test_frames_sample_first_last_and_thumbnail(clips):
    path = clips["moving"]
    with av.open(str(path)) as c:
        src = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    batch = Frames()(Transcode()(clip_rows(path, [(5, 35)])))
    row = batch.to_pylist()[0]
    frames = unpack_frames(row["frames"], row["frames_shape"])
    assert row["frames_shape"] == [8, 96, 160, 3] and frames.dtype == np.uint8
    idx = [5 + i for i in sample_indices(30, 8)]

    def diff(a, b):
        return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())

    for k in (0, -1):  # the first and last samples are the clip's first and last frames
        d = {j: diff(frames[k], src[j]) for j in (idx[k] - 1, idx[k], idx[k] + 1)}
        assert min(d, key=d.get) == idx[k], d
    thumb = cv2.imdecode(np.frombuffer(row["thumbnail"], np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (96, 160, 3)
    middle = cv2.cvtColor(src[5 + 15], cv2.COLOR_RGB2BGR)
    assert diff(thumb, middle) < 6


def test_frames_downscale_and_short_clip(clips):
    cfg = FramesConfig(n=4, max_side=64, thumb_side=32)
    batch = Frames(cfg)(Transcode()(clip_rows(clips["moving"])))
    row = batch.to_pylist()[0]
    assert row["frames_shape"] == [4, 38, 64, 3]
    thumb = cv2.imdecode(np.frombuffer(row["thumbnail"], np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 32
    short = Frames()(Transcode()(clip_rows(clips["short"]))).to_pylist()[0]
    assert short["frames_shape"] == [2, 96, 160, 3]


def test_unpack_frames_checks_size():
    arr = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    assert np.array_equal(unpack_frames(arr.tobytes(), [2, 4, 6, 3]), arr)
    with pytest.raises(ValueError):
        unpack_frames(arr.tobytes(), [2, 4, 7, 3])


# ---------------------------------------------------------------------------------------------- quality


def test_black_static_and_moving_clips(clips):
    black = run_chain(clips["black"])[0]
    assert black["black_fraction"] == 1.0
    assert black["brightness"] < 5 and black["static"] is True
    static = run_chain(clips["static"])[0]
    assert static["static"] is True and static["frame_diff"] < 1.0
    assert static["black_fraction"] == 0.0
    moving = run_chain(clips["moving"])[0]
    assert moving["static"] is False and moving["frame_diff"] > 5
    assert moving["black_fraction"] == 0.0
    assert 40 < moving["brightness"] < 220 and moving["contrast"] > 10
    # quality keeps the sampled frames for later stages
    assert moving["frames"] is not None and moving["frames_shape"][0] == 8


def test_sharpness_prefers_sharp_and_is_scale_independent():
    big = np.full((288, 512, 3), 90, np.uint8)  # a scene with hard edges and text, rendered at 512x288
    for i in range(6):
        cv2.rectangle(big, (20 + 80 * i, 40 + 10 * i), (80 + 80 * i, 140 + 16 * i), (200 - 25 * i, 60, 30 * i), -1)
        cv2.putText(big, f"clip {i}", (16 + 80 * i, 240), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    small = cv2.resize(big, (256, 144), interpolation=cv2.INTER_AREA)  # the same scene filmed at half size
    sharp = np.repeat(small[None], 2, axis=0)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in sharp])
    assert quality_scores(sharp)["sharpness"] > 5 * quality_scores(blurred)["sharpness"]
    big_score = quality_scores(np.repeat(big[None], 2, axis=0))["sharpness"]
    score = quality_scores(sharp)["sharpness"]
    assert big_score == pytest.approx(score, rel=0.05), (big_score, score)


def test_carphone_pristine_sharper_than_distorted():
    paths = [TESTDATA / "carphone_pristine.mp4", TESTDATA / "carphone_distorted.mp4"]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"shared test videos not found in {TESTDATA} (they sit beside the repository in ../shared)")
    pristine, distorted = (run_chain(p)[0] for p in paths)
    assert pristine["sharpness"] > 1.5 * distorted["sharpness"], (pristine["sharpness"], distorted["sharpness"])
    assert pristine["static"] is False and distorted["static"] is False


def test_rows_without_frames_become_errors_and_config_is_validated():
    table = pa.table({"clip_index": [0], "frames": pa.array([None], pa.binary()),
                      "frames_shape": pa.array([None], pa.list_(pa.int32())), "error": pa.array([None], pa.string())})
    row = Quality()(table).to_pylist()[0]
    assert row["error"].startswith("quality: ValueError")
    with pytest.raises(ValidationError):
        QualityConfig(static_treshold=1.0)
    with pytest.raises(ValidationError):
        FramesConfig(n=0)
