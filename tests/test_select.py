"""`clipmill select`: subsets of a real pipeline run are valid datasets with provenance, resumable, guarded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipmill.pipeline.cli import main
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import run
from clipmill.storage.query import run_query
from clipmill.storage.select import SelectError, select_clips, select_subset
from clipmill.storage.shards import read_commits, read_run_json, read_table
from clipmill.storage.stats import dataset_stats
from clipmill.storage.verify import verify_dataset

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def dataset(captioned_dataset):
    return captioned_dataset


def _rows(out: Path, table: str) -> dict[str, dict]:
    key = "clip_id" if table == "clips" else "video_id"
    return {r[key]: r for r in read_table(out, table).to_pylist()}


def test_default_where_is_kept_and_subset_is_a_valid_dataset(dataset, tmp_path):
    src = dataset["out"]
    clips = _rows(src, "clips")
    kept = {c for c, r in clips.items() if r["kept"]}
    assert 0 < len(kept) < len(clips), "the fixture needs kept and rejected clips"
    dest = tmp_path / "sub"
    report = select_subset(src, "kept", dest)
    assert report.written_clips == len(kept) and report.shards >= 1

    verify = verify_dataset(dest)
    assert verify.ok and verify.clean, verify.format()
    sub_clips = _rows(dest, "clips")
    assert set(sub_clips) == kept
    for cid, row in sub_clips.items():  # every column copied, media bytes identical
        src_row = clips[cid]
        assert hashlib.sha256(row["media"]).hexdigest() == src_row["media_sha256"] == row["media_sha256"]
        assert {k: v for k, v in row.items() if k != "media"} == {k: v for k, v in src_row.items() if k != "media"}
    sub_videos = _rows(dest, "videos")
    assert set(sub_videos) == {clips[c]["video_id"] for c in kept}
    for vid, v in sub_videos.items():  # counts are the subset's; other columns the source's
        mine = [r for r in sub_clips.values() if r["video_id"] == vid]
        assert v["n_clips"] == len(mine) and v["n_kept"] == sum(bool(r["kept"]) for r in mine)
        assert v["uri"] == _rows(src, "videos")[vid]["uri"]

    meta = read_run_json(dest)
    src_meta = read_run_json(src)
    assert meta["subset"]["source"] == str(src.resolve()) and meta["subset"]["where"] == "kept"
    assert meta["subset"]["finished_at"] and meta["subset"]["source_run"]["recipe"] == src_meta["recipe"]
    assert meta["recipe"] == src_meta["recipe"]
    assert meta["counts"]["clips"] == len(kept)

    stats = dataset_stats(dest)  # the subset is readable by stats and sql
    assert stats["clips"]["total"] == stats["clips"]["kept"] == len(kept)
    n = run_query(dest, "SELECT count(*) AS n FROM clips WHERE kept").to_pylist()[0]["n"]
    assert n == len(kept)


def test_where_true_and_videos_subquery(dataset, tmp_path):
    src = dataset["out"]
    clips = _rows(src, "clips")
    everything = select_clips(src, "true")
    assert set(everything.clip_ids) == set(clips)
    tall = select_clips(src, "video_id IN (SELECT video_id FROM videos WHERE height > width)")
    assert tall.clip_ids and all(clips[c]["height"] > clips[c]["width"] for c in tall.clip_ids)
    assert {c for c, r in clips.items() if r["height"] > r["width"]} == set(tall.clip_ids)
    dest = tmp_path / "all"
    report = select_subset(src, "true", dest)
    assert report.written_clips == len(clips)
    assert report.clips_without_media == sum(r["media"] is None for r in clips.values()) > 0
    assert verify_dataset(dest).ok
    assert set(_rows(dest, "clips")) == set(clips)


@pytest.mark.parametrize("where, needle", [
    ("nonsense > 1", "nonsense"),
    ("true) ; DELETE FROM clips WHERE (true", "bad --where"),
    ("", "empty --where"),
    ("kept; COPY clips TO 'x.csv'", "bad --where"),
    ("(SELECT 1, 2)", "bad --where"),
])
def test_bad_where_is_a_one_line_error(dataset, tmp_path, where, needle):
    dest = tmp_path / "bad"
    result = CliRunner().invoke(main, ["select", str(dataset["out"]), "--where", where, "-o", str(dest)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("clipmill: error:") and needle in err and "\n" not in err, err
    assert "Traceback" not in result.output
    assert not dest.exists()
    assert len(read_commits(dataset["out"])) == 3  # the source is untouched


def test_refuses_foreign_destinations_and_resumes_same_selection(dataset, tmp_path):
    src = dataset["out"]
    dest = tmp_path / "sub"
    first = select_subset(src, "kept", dest)
    again = select_subset(src, "kept", dest)  # same source + WHERE: a resume that finds everything there
    assert again.resumed and again.written_clips == 0 and again.skipped_clips == first.written_clips
    assert verify_dataset(dest).ok and len(_rows(dest, "clips")) == first.written_clips
    with pytest.raises(SelectError, match="already a subset"):
        select_subset(src, "true", dest)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SelectError, match="not empty"):
        select_subset(src, "kept", other)
    with pytest.raises(SelectError, match="inside the source"):
        select_subset(src, "kept", src / "nested")
    with pytest.raises(SelectError, match="not a clipmill dataset"):
        select_subset(other, "kept", tmp_path / "x")
    assert (other / "notes.txt").read_text() == "mine"


def test_interrupted_select_resumes_to_the_same_subset(dataset, tmp_path):
    src = dataset["out"]
    expected = set(select_clips(src, "true").clip_ids)
    dest = tmp_path / "sub"
    calls = []

    def stop_after_first_shard(phase, done, total):
        calls.append(done)
        if len(calls) == 2:  # after the first source shard: it is committed, the rest is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        select_subset(src, "true", dest, shard_videos=1, progress=stop_after_first_shard)
    partial = read_run_json(dest)
    assert partial["subset"]["finished_at"] is None
    assert 0 < len(_rows(dest, "clips")) < len(expected)
    assert verify_dataset(dest).ok
    result = CliRunner().invoke(main, ["select", str(src), "--where", "true", "-o", str(dest), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["resumed"] and report["skipped_videos"] == 1
    assert set(_rows(dest, "clips")) == expected
    assert len(read_table(dest, "videos")) == len({c.split("-")[0] for c in expected})
    assert read_run_json(dest)["subset"]["finished_at"]
    assert verify_dataset(dest).clean


def test_clipmill_run_into_a_subset_skips_what_it_holds(dataset, tmp_path):
    src = dataset["out"]
    dest = tmp_path / "sub"
    select_subset(src, "kept", dest)
    before = _rows(dest, "clips")
    held = {v["uri"] for v in _rows(dest, "videos").values()}
    items = [it for it in dataset["items"] if it.uri in held]
    stats = run(items, dest, load_recipe(dataset["recipe"]))
    assert stats.skipped == len(items) and stats.videos == 0
    assert _rows(dest, "clips").keys() == before.keys()
    meta = read_run_json(dest)
    assert meta["subset"]["where"] == "kept" and meta["runs"][-1]["skipped_already_committed"] == len(items)
    assert verify_dataset(dest).clean
