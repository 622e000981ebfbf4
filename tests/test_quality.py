"""Frames and quality stages on real decoded clips: sampling, thumbnails, basic and technical quality scores."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill import badfiles
from clipmill.stages.frames import Frames, FramesConfig, FrameSetConfig, sample_indices
from clipmill.stages.framesets import unpack_frames
from clipmill.stages.iqa import Brisque, brisque_model_dir
from clipmill.stages.quality import (
    Quality,
    QualityConfig,
    blockiness_ratio,
    letterbox_box,
    luma,
    quality_scores,
    slideshow_rule,
)
from clipmill.stages.transcode import Transcode
from clipmill.synth import Shot, render_shots, write_video

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


# The frames stage config a recipe gets when it lists the quality stage (the recipe loader adds its sets).
QUALITY_FRAMES = FramesConfig(extra_sets=tuple(
    FrameSetConfig(name=fs.name, n=fs.n, fps=fs.fps, max_side=fs.max_side) for fs in Quality.frame_sets))


@pytest.fixture(scope="module")
def quality() -> Quality:
    """One quality stage for the module (it loads the BRISQUE model once)."""
    return Quality()


def run_chain(path: Path, spans=None, stage: Quality | None = None) -> list[dict]:
    """Transcode -> frames -> quality, each called on the batch the way the runner calls it."""
    batch = Transcode()(clip_rows(path, spans))
    batch = Frames(QUALITY_FRAMES)(batch)
    return (stage or Quality())(batch).to_pylist()


def render(shots: list[Shot], width: int = 320, height: int = 180, seed: int = 0) -> np.ndarray:
    """RGB frames (n, h, w, 3) of synthetic shots (textured content, smooth camera)."""
    frames, _ = render_shots(shots, width, height, seed)
    return np.stack(list(frames()))


def encode(path: Path, frames: np.ndarray, fps: float = 25.0) -> Path:
    """Write RGB frames to an H.264 MP4 (good quality) and return its path."""
    write_video(path, frames, fps, options={"crf": "16", "preset": "veryfast"})
    return path


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


def test_black_static_and_moving_clips(clips, quality):
    black = run_chain(clips["black"], stage=quality)[0]
    assert black["black_fraction"] == 1.0
    assert black["brightness"] < 5 and black["static"] is True
    # a black clip: wholly clipped, no bars (nothing lit to frame), no texture for BRISQUE, no slideshow
    assert black["exposure"] == 1.0 and black["letterbox"] is None and black["brisque"] is None
    assert black["slideshow"] is False and black["blockiness"] == pytest.approx(1.0, abs=0.05)
    static = run_chain(clips["static"], stage=quality)[0]
    assert static["static"] is True and static["frame_diff"] < 1.0
    assert static["black_fraction"] == 0.0
    moving = run_chain(clips["moving"], stage=quality)[0]
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


def test_carphone_pristine_beats_distorted(quality):
    paths = [TESTDATA / "carphone_pristine.mp4", TESTDATA / "carphone_distorted.mp4"]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"shared test videos not found in {TESTDATA} (they sit beside the repository in ../shared)")
    pristine, distorted = (run_chain(p, stage=quality)[0] for p in paths)
    assert pristine["sharpness"] > 1.5 * distorted["sharpness"], (pristine["sharpness"], distorted["sharpness"])
    assert pristine["static"] is False and distorted["static"] is False
    # measured: brisque about 31 vs 43, blockiness about 1.05 vs 1.29 (176x144, 8x8 grid at full size)
    assert distorted["brisque"] > pristine["brisque"] + 5, (pristine["brisque"], distorted["brisque"])
    assert distorted["blockiness"] > pristine["blockiness"] + 0.1, (pristine["blockiness"], distorted["blockiness"])
    assert pristine["blockiness"] < 1.15
    for row in (pristine, distorted):
        assert row["letterbox"] is None and row["slideshow"] is False and row["exposure"] < 0.1


def test_rows_without_frames_become_errors_and_config_is_validated():
    table = pa.table({"clip_index": [0], "frames": pa.array([None], pa.binary()),
                      "frames_shape": pa.array([None], pa.list_(pa.int32())), "error": pa.array([None], pa.string())})
    row = Quality()(table).to_pylist()[0]
    assert row["error"].startswith("quality: ValueError")
    with pytest.raises(ValidationError):
        QualityConfig(static_treshold=1.0)
    with pytest.raises(ValidationError):
        FramesConfig(n=0)


# ---------------------------------------------------------------------------------------------- technical


@pytest.fixture(scope="module")
def pan() -> np.ndarray:
    """3 s of a textured panning shot, 320x180 at 25 fps (RGB frames)."""
    return render([Shot(75, "pan")], seed=3)


def test_brisque_matches_the_brisque_package():
    """Our BRISQUE features follow the package's code, so its trained SVR gives the same scores."""
    pytest.importorskip("brisque", reason="the brisque package is what this test compares against")
    import brisque as pkg  # noqa: PLC0415 - slow import, only here

    class Reference(pkg.BRISQUE):
        def scale_features(self, features):  # brisque 0.2.0 keeps 1-element arrays, which NumPy 2 refuses
            return super().scale_features([float(np.ravel(f)[0]) for f in features])

    ref = Reference(url=False, model_path={"svm": str(brisque_model_dir() / "svm.txt"),
                                           "normalize": str(brisque_model_dir() / "normalize.pickle")})
    ours = Brisque()
    frames = render([Shot(2, "static")], width=160, height=96, seed=5)  # "static" adds noise: no flat areas
    for image in (frames[0], cv2.GaussianBlur(frames[1], (0, 0), 1.5)):
        assert ours.score(image) == pytest.approx(ref.score(image), abs=0.5)


def test_blur_worse_brisque_and_sharpness(tmp_path, pan, quality):
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.5) for f in pan])
    sharp_row = run_chain(encode(tmp_path / "sharp.mp4", pan), stage=quality)[0]
    blur_row = run_chain(encode(tmp_path / "blurred.mp4", blurred), stage=quality)[0]
    assert blur_row["brisque"] > sharp_row["brisque"] + 5, (sharp_row["brisque"], blur_row["brisque"])
    assert blur_row["sharpness"] < 0.5 * sharp_row["sharpness"]
    for row in (sharp_row, blur_row):
        assert row["letterbox"] is None and row["slideshow"] is False and row["static"] is False
        assert row["exposure"] < 0.02 and row["blockiness"] < 1.15


@pytest.mark.parametrize(("name", "pad", "box"), [
    ("letterbox", ((22, 22), (0, 0)), [0, 22, 320, 136]),  # 320x136 picture in 320x180, bars top/bottom
    ("pillarbox", ((0, 0), (38, 42)), [38, 0, 240, 180]),  # 240x180 picture, uneven bars left/right
])
def test_letterbox_and_pillarbox(tmp_path, quality, name, pad, box):
    w, h = box[2], box[3]
    frames = render([Shot(50, "pan")], width=w, height=h, seed=7)
    boxed = np.pad(frames, ((0, 0), *pad, (0, 0)))
    assert boxed.shape[1:3] == (180, 320)
    row = run_chain(encode(tmp_path / f"{name}.mp4", boxed), stage=quality)[0]
    assert (row["clip_width"], row["clip_height"]) == (320, 180)
    assert row["letterbox"] is not None, name
    assert np.abs(np.subtract(row["letterbox"], box)).max() <= 2, (row["letterbox"], box)
    # the bars are not counted as clipped black, and do not make the picture look blocky
    assert row["exposure"] < 0.05 and row["blockiness"] < 1.15


def test_letterbox_unit_cases():
    rng = np.random.default_rng(1)
    picture = rng.uniform(30, 220, (4, 60, 100)).astype(np.float32)
    framed = np.zeros((4, 80, 120), np.float32)
    framed[:, 12:72, 8:108] = picture
    assert letterbox_box(framed) == (8, 12, 100, 60)
    assert letterbox_box(picture) is None  # no bars
    assert letterbox_box(np.zeros((3, 80, 120), np.float32)) is None  # all black: nothing to frame
    # a dark frame among lit ones does not vote
    framed[1] = 0
    assert letterbox_box(framed) == (8, 12, 100, 60)
    # grey bars only count when asked for
    grey = np.full((4, 80, 120), 128, np.float32)
    grey[:, 10:70, :] = rng.uniform(30, 220, (4, 60, 120))
    assert letterbox_box(grey) is None
    assert letterbox_box(grey, QualityConfig(constant_bars=True)) == (0, 10, 120, 60)


def test_overexposed_clip(tmp_path, pan, quality):
    bright = np.clip(pan.astype(np.float32) * 3 + 80, 0, 255).astype(np.uint8)
    normal = run_chain(encode(tmp_path / "normal.mp4", pan[:40]), stage=quality)[0]
    over = run_chain(encode(tmp_path / "over.mp4", bright[:40]), stage=quality)[0]
    assert over["exposure"] > 0.3 > 0.02 > normal["exposure"], (normal["exposure"], over["exposure"])


def test_slideshow_static_and_pan(tmp_path, pan, quality):
    stills = render([Shot(25, "static"), Shot(25, "static"), Shot(25, "static")], seed=11)  # 3 images, 1 s each
    static = render([Shot(75, "static")], seed=12)
    rows = {name: run_chain(encode(tmp_path / f"{name}.mp4", frames), stage=quality)[0]
            for name, frames in (("slideshow", stills), ("static", static), ("pan", pan))}
    assert rows["slideshow"]["slideshow"] is True
    assert rows["static"]["slideshow"] is False and rows["static"]["static"] is True
    assert rows["pan"]["slideshow"] is False and rows["pan"]["static"] is False


def test_slideshow_rule_and_blockiness_on_arrays():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 255, (2, 16, 16)).astype(np.float32)
    assert slideshow_rule(np.stack([a, a, a, b, b, b]))
    assert not slideshow_rule(np.stack([a, a, a, a]))  # static
    assert not slideshow_rule(np.stack([a, b, a, b]))  # every sample changes: no stills held
    ramp = np.stack([a + 3 * k for k in range(6)])  # steady change (a fade): moving, not stills
    assert not slideshow_rule(ramp)
    # blocks: a piecewise-constant 8x8 picture is all boundary steps; smooth noise is not
    blocks = np.kron(rng.uniform(0, 255, (1, 8, 8)), np.ones((1, 8, 8))).astype(np.float32)
    smooth = cv2.GaussianBlur(rng.uniform(0, 255, (64, 64)).astype(np.float32), (0, 0), 2)[None]
    assert blockiness_ratio(blocks, None, (8, 8)) > 10
    assert blockiness_ratio(smooth, None, (8, 8)) == pytest.approx(1.0, abs=0.1)
    assert blockiness_ratio(smooth[:, :12, :12], None, (8, 8)) is None  # too small for two boundaries
    assert luma(np.full((1, 4, 4, 3), 255, np.uint8)).max() == 255


def test_technical_config_is_validated():
    with pytest.raises(ValidationError):
        QualityConfig(exposure_low=250, exposure_high=10)
    with pytest.raises(ValidationError):
        QualityConfig(slideshow_cut=1.0)  # must lie above static_threshold
    with pytest.raises(ValidationError):
        QualityConfig(brisque_frames=9)
    assert Quality(QualityConfig(brisque=False)).brisque is None
