"""Dataset statistics over committed shards: counts, reasons, hours, distributions, text rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.storage.query import QueryError
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import ShardWriter
from clipmill.storage.stats import HIST_BINS, SCORES, dataset_stats, format_stats


def _videos(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=VIDEOS_SCHEMA)


def _clips(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=CLIPS_SCHEMA)


def _clip(i: int, vid: str, **kw) -> dict:
    row = {"clip_id": f"{vid}-{i}", "video_id": vid, "duration_s": float(i), "kept": True, "reject_reasons": [],
           "width": 1920, "height": 1080, "aspect_bucket": "16:9", "brightness": 0.1 * i, "contrast": 0.5,
           "sharpness": 100.0 + i, "frame_diff": 1.0, "black_fraction": 0.0, "media": b"mp4"}
    row.update(kw)
    return row


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    with ShardWriter(out) as w:
        # v1: 10 clips of 1..10 s, clips 1-3 rejected
        clips = [_clip(i, "v1") for i in range(1, 11)]
        clips[0].update(kept=False, reject_reasons=["dark", "static"])
        clips[1].update(kept=False, reject_reasons=["dark"])
        clips[2].update(kept=False, reject_reasons=["too_short"], width=720, height=1280, aspect_bucket="9:16")
        w.commit(_videos({"video_id": "v1", "uri": "a.mp4", "status": "done", "duration_s": 3600.0,
                          "codec": "h264"}), _clips(*clips))
        w.commit(_videos({"video_id": "v2", "uri": "b.mp4", "status": "rejected", "reason": "unreadable"},
                         {"video_id": "v3", "uri": "c.mp4", "status": "rejected", "reason": "unreadable"},
                         {"video_id": "v4", "uri": "d.mp4", "status": "failed", "reason": "decode error",
                          "duration_s": 1800.0, "codec": "vp9"}),
                 _clips())
    # not committed: must not count
    pq.write_table(_clips(_clip(99, "vx")), out / "clips" / "part-00042.parquet")
    return out


def test_counts_reasons_and_hours(dataset: Path) -> None:
    s = dataset_stats(dataset)
    assert s["inputs"] == {"total": 4, "by_status": {"done": 1, "rejected": 2, "failed": 1}}
    assert s["input_reasons"] == {"rejected": {"unreadable": 2}, "failed": {"decode error": 1}}
    assert s["clips"] == {"total": 10, "kept": 7, "rejected": 3, "undecided": 0}
    assert s["reject_reasons"] == {"dark": 2, "static": 1, "too_short": 1}
    assert s["hours"]["videos"] == pytest.approx(1.5)
    assert s["hours"]["clips"] == pytest.approx(55 / 3600)
    assert s["hours"]["kept_clips"] == pytest.approx((55 - 6) / 3600)
    assert s["resolutions"] == {"1920x1080": 9, "720x1280": 1}
    assert s["aspect_buckets"] == {"16:9": 9, "9:16": 1}
    assert s["codecs"] == {"h264": 1, "unknown": 2, "vp9": 1}
    json.dumps(s)  # plain JSON-able data


def test_distributions(dataset: Path) -> None:
    s = dataset_stats(dataset)
    d = s["clip_duration"]
    assert (d["count"], d["min"], d["max"]) == (10, 1.0, 10.0)
    assert d["p50"] == pytest.approx(5.5)
    assert d["p10"] == pytest.approx(1.9)
    assert d["p90"] == pytest.approx(9.1)
    assert len(d["histogram"]) == HIST_BINS
    assert sum(b["count"] for b in d["histogram"]) == 10
    assert [b["count"] for b in d["histogram"]] == [1] * HIST_BINS  # 1..10 s in bins of 0.9 s; max in the last
    assert d["histogram"][0]["lo"] == 1.0 and d["histogram"][-1]["hi"] == pytest.approx(10.0)
    assert set(s["scores"]) == set(SCORES)
    assert s["scores"]["sharpness"]["min"] == pytest.approx(101.0)
    assert s["scores"]["brightness"]["max"] == pytest.approx(1.0)
    assert s["scores"]["black_fraction"]["p50"] == 0.0


def test_format_stats_is_readable_text(dataset: Path) -> None:
    text = format_stats(dataset_stats(dataset))
    assert "inputs (4)" in text
    assert "unreadable  2" in text
    assert "kept 7 (70.0%)" in text
    assert "dark       2" in text
    assert "#" in text
    assert "sharpness" in text and "16:9" in text and "h264" in text


def test_empty_dataset(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    with ShardWriter(out):
        pass
    s = dataset_stats(out)
    assert s["inputs"]["total"] == 0
    assert s["clips"] == {"total": 0, "kept": 0, "rejected": 0, "undecided": 0}
    assert s["clip_duration"]["count"] == 0 and s["clip_duration"]["p50"] is None
    assert s["clip_duration"]["histogram"] == []
    assert all(v["count"] == 0 for v in s["scores"].values())
    assert s["hours"] == {"videos": 0.0, "clips": 0.0, "kept_clips": 0.0}
    text = format_stats(s)
    assert "inputs (0)" in text and "clips: 0" in text


def test_only_rejected_inputs(tmp_path: Path) -> None:
    out = tmp_path / "rej"
    with ShardWriter(out) as w:
        w.commit(_videos({"video_id": "v1", "uri": "a.txt", "status": "rejected", "reason": "not a video"}), _clips())
    s = dataset_stats(out)
    assert s["inputs"]["by_status"] == {"done": 0, "rejected": 1, "failed": 0}
    assert s["input_reasons"]["rejected"] == {"not a video": 1}
    assert s["clips"]["total"] == 0 and s["reject_reasons"] == {}
    assert "not a video" in format_stats(s)


def test_single_duration_gives_one_bin(tmp_path: Path) -> None:
    out = tmp_path / "one"
    with ShardWriter(out) as w:
        w.commit(_videos({"video_id": "v1", "uri": "a.mp4", "status": "done"}),
                 _clips(_clip(1, "v1", clip_id="a", duration_s=4.0), _clip(2, "v1", clip_id="b", duration_s=4.0)))
    hist = dataset_stats(out)["clip_duration"]["histogram"]
    assert hist == [{"lo": 4.0, "hi": 4.0, "count": 2}]


def test_not_a_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="not a directory"):
        dataset_stats(tmp_path / "missing")
