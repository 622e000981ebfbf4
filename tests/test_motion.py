"""Motion stage: optical-flow motion score and camera-motion labels on known synthetic and encoded motion.

Frames are a textured image seen by a camera whose motion we set (content shift per frame, zoom factor),
either straight from NumPy or encoded to H.264 and decoded by the frames stage, as in a run. Direction
convention under test: `pan_left` = content moves right in the frame, `tilt_up` = content moves down.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill.stages.frames import Frames, FramesConfig, FrameSetConfig
from clipmill.stages.motion import (
    CAMERA_MOTIONS,
    SAMPLE_FPS,
    SAMPLE_MAX_SIDE,
    Motion,
    MotionConfig,
    flow_stats,
    sample_interval,
)
from clipmill.synth import Shot, make_shots_video, write_video

DIAG = math.hypot(160, 90)


def texture(seed: int = 0, width: int = 1280, height: int = 720) -> np.ndarray:
    """A random multi-scale RGB texture with hard-edged shapes (uint8, height x width x 3)."""
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width), np.float32)
    for cells, weight in ((6, 1.0), (20, 0.6), (60, 0.4), (200, 0.25)):
        small = rng.standard_normal((max(2, cells * height // width), cells)).astype(np.float32)
        base += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    base = (base - base.min()) / (base.max() - base.min()) * 220 + 15
    img = np.repeat(base[..., None], 3, axis=2)
    img[..., 0] = 255 - img[..., 0] * 0.7
    for _ in range(40):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(8, 60))
        cv2.circle(img, (x, y), r, tuple(float(c) for c in rng.uniform(0, 255, 3)), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


TEX = texture()


def camera(n: int, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, width: int = 160,
           height: int = 90) -> np.ndarray:
    """n frames (n, height, width, 3) of TEX: content moves (dx, dy) px per frame and scales by `zoom` per frame.

    Shifts are in output pixels at `width`, so (dx, dy) scale with the frame size like real footage does.
    """
    frames = []
    for k in range(n):
        scale = zoom**k * width / 640
        mat = np.array([[scale, 0, 0], [0, scale, 0]], np.float64)
        mat[:, 2] = (width / 2 - scale * TEX.shape[1] / 2 + dx * k, height / 2 - scale * TEX.shape[0] / 2 + dy * k)
        frames.append(cv2.warpAffine(TEX, mat, (width, height), flags=cv2.INTER_AREA,
                                     borderMode=cv2.BORDER_REFLECT_101))
    return np.stack(frames)


# ---------------------------------------------------------------------------------------------- flow_stats


def test_pan_left_and_right_are_opposite():
    right = flow_stats(camera(9, dx=3), 0.25)  # content moves right: the camera turns left
    left = flow_stats(camera(9, dx=-3), 0.25)
    assert right["camera_motion"] == "pan_left" and left["camera_motion"] == "pan_right"
    assert right["translation"][0] > 0 > left["translation"][0]
    # 3 px per sample, 4 samples per second, on a 160x90 frame: 12 / 183.6 diagonals per second
    assert right["motion_score"] == pytest.approx(12 / DIAG, rel=0.05)
    assert left["motion_score"] == pytest.approx(right["motion_score"], rel=0.05)


def test_tilt_up_and_down():
    down = flow_stats(camera(9, dy=3), 0.25)  # content moves down: the camera tilts up
    up = flow_stats(camera(9, dy=-3), 0.25)
    assert down["camera_motion"] == "tilt_up" and up["camera_motion"] == "tilt_down"
    assert down["translation"][1] > 0 > up["translation"][1]


def test_zoom_in_and_out():
    zin = flow_stats(camera(9, zoom=1.04), 0.25)
    zout = flow_stats(camera(9, zoom=1 / 1.04), 0.25)
    assert zin["camera_motion"] == "zoom_in" and zout["camera_motion"] == "zoom_out"
    assert zin["zoom"] > 0 > zout["zoom"]
    assert abs(zin["translation"][0]) < 0.1 * zin["zoom"]


def test_static_scores_near_zero():
    stats = flow_stats(camera(9), 0.25)
    assert stats["camera_motion"] == "static" and stats["motion_score"] < 1e-3
    one = flow_stats(camera(1), 0.25)
    assert one["camera_motion"] == "static" and one["motion_score"] == 0.0 and one["pairs"] == 0


def test_faster_pan_scores_higher_even_beyond_flow_range():
    # 35 px per sample is beyond DIS alone at 160 px; the phase-correlation seed keeps track of it
    scores = [flow_stats(camera(6, dx=dx), 0.25) for dx in (1, 4, 12, 35)]
    assert [s["camera_motion"] for s in scores] == ["pan_left"] * 4
    values = [s["motion_score"] for s in scores]
    assert values == sorted(values), values
    assert values[-1] == pytest.approx(35 * 4 / DIAG, rel=0.05)


def test_score_is_comparable_across_frame_sizes_and_sampling_rates():
    small = flow_stats(camera(5, dx=2.4, width=128, height=72), 0.25)["motion_score"]
    mid = flow_stats(camera(5, dx=3, width=160, height=90), 0.25)["motion_score"]
    large = flow_stats(camera(5, dx=12, width=640, height=360), 0.25)["motion_score"]  # downscaled to 160
    assert small == pytest.approx(mid, rel=0.05) and large == pytest.approx(mid, rel=0.05)
    dense = camera(9, dx=1.5)  # 8 samples per second, half the shift per sample
    assert flow_stats(dense, 0.125)["motion_score"] == pytest.approx(flow_stats(dense[::2], 0.25)["motion_score"],
                                                                     rel=0.05)


def test_independent_noise_is_complex_not_a_pan():
    rng = np.random.default_rng(3)
    for shape in ((6, 90, 160, 3), (6, 72, 128, 3)):
        stats = flow_stats(rng.integers(0, 256, shape, dtype=np.uint8), 0.25)
        assert stats["camera_motion"] == "complex", stats["labels"]
        assert stats["fit"] < 0.4 and stats["motion_score"] > 0.02


def test_object_moving_before_a_still_camera_is_static():
    frames = camera(9)
    for k, f in enumerate(frames):
        cv2.rectangle(f, (20 + 12 * k, 30), (50 + 12 * k, 60), (250, 20, 20), -1)
    stats = flow_stats(frames, 0.25)
    assert set(stats["labels"]) == {"static"} and stats["camera_motion"] == "static"
    assert stats["camera_speed"] < MotionConfig().static_threshold / 2


def test_flow_stats_checks_its_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        flow_stats(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="interval_s"):
        flow_stats(camera(2), 0.0)


def test_sample_interval_follows_the_frames_stage():
    assert sample_interval(41, 25.0, 4.0) == pytest.approx(0.25)
    assert sample_interval(10, 2.0, 4.0) == pytest.approx(0.5)  # slower clip than the set: every frame
    assert sample_interval(2, 25.0, 4.0, total_frames=4) == pytest.approx(3 / 25)  # shorter than one step
    with pytest.raises(ValueError):
        sample_interval(3, 0.0)


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, bytes]:
    """2 s H.264 clips at 320x180, 25 fps: known camera moves, plus synth's static and zoom shots."""
    d = tmp_path_factory.mktemp("motion_inputs")
    moves = {"pan_left": {"dx": 2.0}, "pan_right_fast": {"dx": -5.0}, "pan_right": {"dx": -1.2},
             "tilt_down": {"dy": -1.0}, "zoom_out": {"zoom": 1 / 1.008}}
    out = {}
    for name, move in moves.items():
        write_video(d / f"{name}.mp4", camera(50, width=320, height=180, **move), 25)
        out[name] = (d / f"{name}.mp4").read_bytes()
    for motion in ("static", "zoom"):
        make_shots_video(d / f"synth_{motion}.mp4", [Shot(50, motion)], width=320, height=180, fps=25, seed=4)
        out[f"synth_{motion}"] = (d / f"synth_{motion}.mp4").read_bytes()
    return out


def run_stages(media: dict[str, bytes]) -> dict[str, dict]:
    """Frames (with the motion set, as the recipe loader adds it) -> Motion, called like the runner calls them."""
    names = list(media)
    table = pa.table({
        "uri": names + ["broken.mp4", "nothing.mp4"],
        "clip_index": pa.array([0] * len(names) + [0, -1], pa.int32()),
        "fps": [25.0] * (len(names) + 2),
        "media": pa.array(list(media.values()) + [None, None], pa.binary()),
        "error": pa.array([None] * len(names) + ["transcode: ValueError: bad", None], pa.string()),
    })
    spec = Motion.frame_sets[0]
    frames_cfg = FramesConfig(n=2, extra_sets=(FrameSetConfig(name=spec.name, fps=spec.fps, max_side=spec.max_side),))
    out = Motion()(Frames(frames_cfg)(table))
    assert out.schema.field("motion_score").type == pa.float32()
    assert out.schema.field("camera_motion").type == pa.string()
    assert "frames_motion" not in out.schema.names and "frames" in out.schema.names
    return {r["uri"]: r for r in out.to_pylist()}


def test_stage_on_encoded_clips(encoded):
    rows = run_stages(encoded)
    labels = {name: rows[name]["camera_motion"] for name in encoded}
    assert labels == {"pan_left": "pan_left", "pan_right_fast": "pan_right", "pan_right": "pan_right",
                      "tilt_down": "tilt_down", "zoom_out": "zoom_out", "synth_static": "static",
                      "synth_zoom": "zoom_in"}
    assert all(rows[name]["error"] is None for name in encoded)
    assert rows["synth_static"]["motion_score"] < 0.002
    # 2 px per frame at 320 px wide, 25 fps: 50 / 367 diagonals per second
    assert rows["pan_left"]["motion_score"] == pytest.approx(50 / math.hypot(320, 180), rel=0.1)
    assert rows["pan_right_fast"]["motion_score"] > 2 * rows["pan_right"]["motion_score"] > 0.1
    # rows that carry an error or have no clip pass through untouched
    assert rows["broken.mp4"]["error"] == "transcode: ValueError: bad" and rows["broken.mp4"]["motion_score"] is None
    assert rows["nothing.mp4"]["camera_motion"] is None


def test_stage_reports_missing_inputs_as_row_errors():
    frames = camera(3)
    table = pa.table({
        "clip_index": pa.array([0, 0, 0], pa.int32()),
        "fps": pa.array([25.0, None, 25.0]),
        "frames_motion": pa.array([None, frames.tobytes(), frames.tobytes()], pa.binary()),
        "frames_motion_shape": pa.array([None, list(frames.shape), list(frames.shape)], pa.list_(pa.int32())),
        "error": pa.array([None, None, None], pa.string()),
    })
    rows = Motion()(table).to_pylist()
    assert rows[0]["error"].startswith("motion: ValueError: row has no frames_motion")
    assert rows[1]["error"].startswith("motion: ValueError: row has no usable fps")
    assert rows[2]["error"] is None and rows[2]["camera_motion"] == "static"


def test_declarations_and_config():
    assert Motion.frame_sets[0].fps == SAMPLE_FPS and Motion.frame_sets[0].max_side == SAMPLE_MAX_SIDE
    assert set(Motion.adds) == {"motion_score", "camera_motion"}
    assert len(CAMERA_MOTIONS) == 8
    with pytest.raises(ValidationError):
        MotionConfig(static_treshold=0.1)
    with pytest.raises(ValidationError):
        MotionConfig(preset="slow")
    with pytest.raises(ValidationError):
        MotionConfig(min_fit=1.5)
    cfg = MotionConfig(static_threshold=1.0)  # everything slower than a frame diagonal per second is static
    assert flow_stats(camera(5, dx=3), 0.25, cfg)["camera_motion"] == "static"
