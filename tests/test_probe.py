"""Probe stage on broken, exotic and real videos: bad inputs become rejected rows, never exceptions."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill import badfiles, synth
from clipmill.stages.probe import Probe, ProbeConfig
from clipmill.storage.ids import video_id_from_path
from clipmill.storage.schema import VIDEO_FIELDS

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"

# maker name -> expected start of the rejection reason
EXPECTED_REJECTIONS = {
    "truncated": "unreadable: ",
    "truncated_faststart": "truncated: ",
    "garbage_payload": "undecodable: ",
    "header_corrupted": "unreadable: ",
    "random_bytes": "unreadable: ",
    "empty": "empty_file",
    "text": "unreadable: ",
    "audio_only": "no_video_stream",
    "tiny": "too_small: 16x16",
}

# maker name -> (codec, width, height, frames, fps)
EXPECTED_EXOTIC = {
    "vp9_webm": ("vp9", 160, 96, 24, 24.0),
    "hevc_mkv": ("hevc", 160, 96, 24, 25.0),
    "av1_mkv": ("av1", 160, 96, 24, 24.0),
    "mpeg4_avi": ("mpeg4", 160, 96, 24, 25.0),
    "odd_size": ("h264", 177, 99, 24, 24.0),
    "very_short": ("h264", 160, 96, 2, 24.0),
    "vfr": ("h264", 160, 96, None, None),
    "pts_offset": ("h264", 160, 96, 30, 25.0),
    "rotated": ("h264", 160, 96, 24, 24.0),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("probe_inputs")
    made = {name: maker(d) for name, maker in {**badfiles.BROKEN_MAKERS, **badfiles.EXOTIC_MAKERS}.items()}
    made["audio_only_opus"] = badfiles.make_audio_only(d, codec="libopus")
    made["valid"] = badfiles.make_valid(d)
    made["valid_audio"] = badfiles.make_valid(d, name="valid_audio.mp4", audio=True)
    return made


@pytest.fixture(scope="module")
def probed(files) -> dict[str, dict]:
    """Every generated file probed in one batch, as the runner would call the stage."""
    names = list(files)
    out = Probe()(pa.table({"uri": [str(files[n]) for n in names]}))
    assert out.num_rows == len(names)
    return dict(zip(names, out.to_pylist(), strict=True))


@pytest.mark.parametrize("name", sorted(EXPECTED_REJECTIONS))
def test_broken_inputs_are_rejected_with_reason(probed, name):
    row = probed[name]
    assert row["status"] == "rejected", row
    assert row["reason"].startswith(EXPECTED_REJECTIONS[name]), row["reason"]
    assert len(row["video_id"]) == 16


def test_audio_only_opus_rejected_but_audio_seen(probed):
    row = probed["audio_only_opus"]
    assert (row["status"], row["reason"], row["has_audio"]) == ("rejected", "no_video_stream", True)


@pytest.mark.parametrize("name", sorted(EXPECTED_EXOTIC))
def test_exotic_valid_inputs_are_done(probed, files, name):
    row = probed[name]
    codec, width, height, n_frames, fps = EXPECTED_EXOTIC[name]
    assert row["status"] == "done", row
    assert row["reason"] is None
    assert (row["codec"], row["width"], row["height"]) == (codec, width, height)
    if n_frames is not None:
        assert row["n_frames"] == n_frames
        assert row["fps"] == pytest.approx(fps, rel=1e-3)
        assert row["duration_s"] == pytest.approx(n_frames / fps, abs=0.1)
    assert row["video_id"] == video_id_from_path(str(files[name]))
    assert row["rotation"] == (90 if name == "rotated" else 0)
    assert row["has_audio"] is False


def test_vfr_duration_and_frame_estimate(probed):
    row = probed["vfr"]  # 40 frames with 20/40/60 ms gaps: about 1.6 s
    assert row["duration_s"] == pytest.approx(1.6, abs=0.1)
    assert 20 <= row["n_frames"] <= 60


def test_valid_with_audio_and_container_names(probed):
    assert probed["valid"]["status"] == "done"
    assert probed["valid"]["has_audio"] is False
    assert probed["valid_audio"]["has_audio"] is True
    assert probed["valid"]["container"] == "mp4"
    assert probed["vp9_webm"]["container"] == "webm"
    assert probed["hevc_mkv"]["container"] == "matroska"
    assert probed["mpeg4_avi"]["container"] == "avi"
    assert probed["odd_size"]["pix_fmt"] == "yuv444p"


def test_output_schema_matches_storage_types(files):
    out = Probe()(pa.table({"uri": [str(files["valid"]), str(files["empty"])]}))
    types = {f.name: f.type for f in VIDEO_FIELDS}
    for name in Probe.adds:
        assert out.schema.field(name).type == types[name]


def test_missing_directory_file_url_and_remote_uri(files, tmp_path):
    uris = [str(tmp_path / "missing.mp4"), str(tmp_path), files["valid"].as_uri(), "nosuch://bucket/video.mp4"]
    rows = Probe()(pa.table({"uri": uris})).to_pylist()
    assert [r["status"] for r in rows] == ["rejected", "rejected", "done", "rejected"]
    assert rows[0]["reason"] == "not_found"
    assert rows[1]["reason"] == "not_a_file"
    assert rows[3]["reason"].startswith("unsupported_uri")
    assert rows[2]["video_id"] == video_id_from_path(str(files["valid"]))
    assert all(r["video_id"] for r in rows)  # non-null even when the bytes cannot be read
    again = Probe()(pa.table({"uri": uris})).to_pylist()
    assert [r["video_id"] for r in again] == [r["video_id"] for r in rows]


def test_config_min_side_and_full_hash(files):
    cfg = ProbeConfig(min_side=8, full_hash=True)
    row = Probe(cfg)(pa.table({"uri": [str(files["tiny"])]})).to_pylist()[0]
    assert row["status"] == "done"
    assert row["video_id"] == video_id_from_path(str(files["tiny"]), full=True)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        ProbeConfig(min_sidee=8)
    with pytest.raises(ValidationError):
        ProbeConfig(min_side=0)


def test_rows_already_rejected_or_failed_pass_through(files):
    batch = pa.table({"uri": [str(files["valid"])] * 2, "error": ["split: boom", None]})
    rows = Probe()(batch).to_pylist()
    assert rows[0]["status"] is None and rows[0]["error"] == "split: boom"
    assert rows[1]["status"] == "done"


def test_shared_testdata_probes_like_truth():
    if not TESTDATA.is_dir():
        pytest.skip(f"shared test videos not found at {TESTDATA} (they sit beside the repository in ../shared)")
    truth = json.loads((TESTDATA / "truth.json").read_text())
    names = sorted(truth)
    rows = Probe()(pa.table({"uri": [str(TESTDATA / n) for n in names]})).to_pylist()
    for name, row in zip(names, rows, strict=True):
        assert row["status"] == "done", row
        assert row["n_frames"] == truth[name]["frames"], name
        assert row["fps"] == pytest.approx(truth[name]["fps"], rel=1e-4), name
    by_name = dict(zip(names, rows, strict=True))
    assert by_name["bigbuckbunny.mp4"]["has_audio"] is True
    assert (by_name["bigbuckbunny.mp4"]["width"], by_name["bigbuckbunny.mp4"]["height"]) == (1280, 720)
    assert by_name["fades.mp4"]["codec"] == "mpeg4"
    assert by_name["delayed_start.mp4"]["duration_s"] == pytest.approx(0.96, abs=0.05)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="thread scheduling policies are Linux-only")
def test_writing_av1_leaves_the_thread_scheduling_as_it_was(tmp_path):
    """SVT-AV1 run as root leaves the thread that opened it in SCHED_FIFO at priority 99, and threads started
    later inherit it (spinning OpenMP workers then starved a whole test session). Both writers put it back.
    As non-root SVT cannot raise the priority and the test checks nothing beyond that."""
    before = os.sched_getscheduler(0)
    badfiles.make_av1_mkv(tmp_path, n=8)
    assert os.sched_getscheduler(0) == before
    synth.write_video(tmp_path / "b.mkv", badfiles.moving_frames(8), 24, codec="libsvtav1",
                      options={"preset": "12", "crf": "40"})
    seen = []
    worker = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
    worker.start()
    worker.join()
    assert os.sched_getscheduler(0) == before and seen == [before]
