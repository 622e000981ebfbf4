"""Clip spans from shot boundaries: trimming, transition exclusion, windowing, too-short drops."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clipmill.stages.split import Span, Split, SplitConfig, shot_spans, window


def test_shots_between_cuts_are_trimmed_only_at_boundaries():
    shots, skipped = shot_spans(100, [30, 60], [], trim=2)
    assert shots == [Span(0, 28), Span(32, 58), Span(62, 100)]
    assert skipped == []


def test_transition_frames_belong_to_no_shot():
    shots, skipped = shot_spans(100, [], [(40, 54)], trim=1)
    assert shots == [Span(0, 39), Span(56, 100)]
    assert skipped == [{"first": 40, "last": 54, "reason": "transition"}]


def test_cut_at_edge_and_out_of_range_are_ignored():
    shots, _ = shot_spans(50, [0, 50, 99], [], trim=2)
    assert shots == [Span(0, 50)]


def test_window_even_and_fixed():
    clips, rest = window(Span(0, 250), min_len=50, max_len=100, mode="even")
    assert clips == [Span(0, 83), Span(83, 166), Span(166, 249)] and rest == [Span(249, 250)]
    clips, rest = window(Span(0, 230), min_len=50, max_len=100, mode="fixed")
    assert clips == [Span(0, 100), Span(100, 200)] and rest == [Span(200, 230)]
    clips, rest = window(Span(10, 40), min_len=50, max_len=100, mode="even")
    assert clips == [] and rest == [Span(10, 40)]


def test_every_clip_within_limits_and_disjoint():
    for n in range(1, 400, 7):
        clips, _ = window(Span(0, n), min_len=20, max_len=60, mode="even")
        assert all(20 <= c.length <= 60 for c in clips)
        assert all(a.end <= b.start for a, b in zip(clips, clips[1:], strict=False))


def test_split_stage_fans_out_with_frame_exact_spans(testdata):
    stage = Split(SplitConfig(min_s=1.0, max_s=3.0, trim_frames=1))
    batch = pa.table({"uri": [str(testdata / "bikes.mp4")], "video_id": ["v1"], "error": pa.nulls(1, pa.string())})
    rows = stage(batch).to_pylist()
    assert rows[0]["cuts"] == pytest.approx([30, 76, 137, 187, 242], abs=1)
    assert [r["clip_index"] for r in rows] == list(range(len(rows)))
    assert all(r["n_clips"] == len(rows) for r in rows)
    for r in rows:
        assert 25 <= r["end_frame"] - r["start_frame"] <= 75
        assert r["clip_id"] == f"v1-{r['start_frame']:07d}-{r['end_frame']:07d}"
        assert not any(r["start_frame"] <= c < r["end_frame"] and c != r["start_frame"] for c in r["cuts"])
        assert r["start_pts"] is not None
    assert any(s["reason"] == "too_short" for s in rows[0]["skipped_spans"])  # 242..250 is 0.3 s


def test_split_stage_records_errors_per_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    batch = pa.table({"uri": [str(bad)], "video_id": ["v"], "error": pa.nulls(1, pa.string())})
    rows = Split(SplitConfig())(batch).to_pylist()
    assert len(rows) == 1 and rows[0]["clip_index"] == -1
    assert rows[0]["error"].startswith("split: ")
