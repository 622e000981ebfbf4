"""Assembling work rows into ledger rows and clip rows: grouping, failures, media policy, timings."""

from __future__ import annotations

import json
import random

from clipmill.pipeline.ledger import Assembler, video_result


def _rows(uri, n, **extra):
    base = {"uri": uri, "video_id": uri[-1], "status": "done", "n_clips": n, "fps": 25.0, "duration_s": 10.0}
    if n == 0:
        return [dict(base, clip_index=-1, **extra)]
    return [dict(base, clip_index=i, clip_id=f"{uri}-{i}", start_frame=i * 50, end_frame=i * 50 + 50,
                 start_s=i * 2.0, end_s=i * 2.0 + 2.0, media=b"m" * 5, kept=i % 2 == 0,
                 reject_reasons=[] if i % 2 == 0 else ["static"],
                 _timings=json.dumps({"split": 1.0, "transcode": 0.5}) if i == 0 else json.dumps({"transcode": 0.5}),
                 **extra) for i in range(n)]


def test_videos_complete_only_when_all_clip_rows_arrived_in_any_order():
    rows = _rows("/a", 3) + _rows("/b", 0) + _rows("/c", 2)
    random.Random(1).shuffle(rows)
    asm = Assembler()
    done = []
    for r in rows:
        done += asm.add([r])
    assert sorted(v.video["uri"] for v in done) == ["/a", "/b", "/c"]
    assert asm.incomplete == []
    a = next(v for v in done if v.video["uri"] == "/a")
    assert [c["clip_index"] for c in a.clips] == [0, 1, 2]
    assert a.video["n_clips"] == 3 and a.video["n_kept"] == 2
    assert a.stage_seconds == {"split": 1.0, "transcode": 1.5}


def test_a_video_delivered_twice_is_completed_once():
    """A retried Ray task can hand back rows the driver already has; the video must be ledgered once."""
    asm = Assembler()
    first = asm.add(_rows("/a", 2) + _rows("/b", 0))
    again = asm.add(_rows("/a", 2) + _rows("/b", 0))
    assert sorted(v.video["uri"] for v in first) == ["/a", "/b"]
    assert again == [] and asm.duplicate_rows == 3 and asm.incomplete == []


def test_partial_video_is_reported_incomplete():
    asm = Assembler()
    assert asm.add(_rows("/a", 3)[:2]) == []
    assert asm.incomplete == ["/a"]


def test_any_error_fails_the_whole_video_and_drops_its_clips():
    rows = _rows("/a", 3)
    rows[2]["error"] = "transcode: ValueError: boom"
    res = video_result(rows)
    assert res.video["status"] == "failed" and res.video["reason"] == "transcode: ValueError: boom"
    assert res.clips == [] and res.video["n_clips"] == 0


def test_rejected_keeps_its_reason():
    res = video_result(_rows("/a", 0, status="rejected", reason="empty_file"))
    assert res.video["status"] == "rejected" and res.video["reason"] == "empty_file"


def test_media_policy():
    kept_only = video_result(_rows("/a", 2), media="kept").clips
    assert kept_only[0]["media"] and kept_only[1]["media"] is None
    assert all(c["media"] for c in video_result(_rows("/a", 2), media="all").clips)
    assert all(c["media"] is None for c in video_result(_rows("/a", 2), media="none").clips)


def test_a_video_without_content_id_still_gets_a_deterministic_id():
    rows = _rows("/a", 0, status="rejected", reason="unreadable: x")
    rows[0]["video_id"] = None
    a, b = video_result(rows), video_result([dict(rows[0])])
    assert a.video["video_id"].startswith("uri-") and a.video["video_id"] == b.video["video_id"]
