"""Dataset verification (every promise of the commit records) and repair by quarantine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from clipmill.storage import ids
from clipmill.storage.dedup import TMP_DIR, dedup_dataset
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import DatasetError, ShardWriter, committed_keys, read_commits, read_table
from clipmill.storage.verify import QUARANTINE, TMP_DEDUP, repair_dataset, verify_dataset


def _tables(videos: list[tuple[str, str]], n_clips: int = 2, embedding: list[float] | None = None):
    """(videos, clips) tables of `videos` = [(video_id, uri)], n_clips clips each, a few bytes of media."""
    vt = pa.Table.from_pylist([{"video_id": v, "uri": u, "status": "done", "n_clips": n_clips} for v, u in videos],
                              schema=VIDEOS_SCHEMA)
    rows = [{"clip_id": ids.clip_id(v, 10 * i, 10 * i + 10), "video_id": v, "uri": u, "clip_index": i,
             "media": b"mp4" * 3, "kept": True, "width": 64, "height": 36,
             "embedding": embedding, "embedding_model": "m" if embedding else None}
            for v, u in videos for i in range(n_clips)]
    return vt, pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA)


def _uri(vid: str) -> str:
    return f"/videos/{vid}.mp4"


def _build(out, shards=(("a", "b"), ("c", "d"), ("e",))):
    with ShardWriter(out) as w:
        for vids in shards:
            w.commit(*_tables([(v, _uri(v)) for v in vids]))
    return out


def _kinds(report):
    return {(p.shard, p.file, p.kind) for p in report.problems}


@pytest.fixture
def ds(tmp_path):
    return _build(tmp_path / "out")


@pytest.mark.parametrize("checksums", [True, False])
def test_clean_dataset_verifies_ok(ds, checksums):
    seen = []
    r = verify_dataset(ds, checksums=checksums, progress=lambda *a: seen.append(a))
    assert r.ok and r.clean, r.format()
    assert (r.shards, r.files, r.videos, r.clips) == (3, 6, 5, 10)
    assert r.bytes_hashed == (r.bytes if checksums else 0)
    assert seen[-1] == ("verify", 3, 3)
    assert json.loads(json.dumps(r.to_json()))["ok"] is True
    assert "Nothing to do" in r.format()


def test_flipped_byte_is_a_checksum_problem_naming_shard_and_inputs(ds):
    path = ds / "clips" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = verify_dataset(ds)
    assert not r.ok
    assert ("part-00001", "clips/part-00001.parquet", "checksum") in _kinds(r)
    assert r.broken_shards == ["part-00001"]
    assert r.rerun_uris == [_uri("c"), _uri("d")]
    text = r.format()
    assert f"clipmill verify {ds} --repair" in text and "re-process 2 input(s)" in text and _uri("c") in text


def test_deleted_videos_file_is_missing(ds):
    (ds / "videos" / "part-00002.parquet").unlink()
    r = verify_dataset(ds, checksums=False)
    assert _kinds(r) == {("part-00002", "videos/part-00002.parquet", "missing")}
    assert r.rerun_uris == [_uri("e")]


def test_truncated_file_is_size_and_unreadable(ds):
    path = ds / "clips" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    kinds = {k for _, _, k in _kinds(verify_dataset(ds))}
    assert {"size", "unreadable"} <= kinds


def test_corrupt_commit_record_is_a_record_problem(ds):
    (ds / "_commits" / "part-00001.json").write_text('{"shard": "part-00001", "fil')
    r = verify_dataset(ds)
    assert _kinds(r) == {("part-00001", "_commits/part-00001.json", "record")}
    assert r.rerun_uris == [_uri("c"), _uri("d")]  # read from the shard's videos file
    assert not r.leftovers  # the shard's data files go with the problem, not with the leftovers


def test_record_that_disagrees_with_its_file(ds):
    path = ds / "_commits" / "part-00000.json"
    rec = json.loads(path.read_text())
    rec["uris"] = [_uri("a"), "/elsewhere/b.mp4"]
    path.write_text(json.dumps(rec))
    assert ("part-00000", "videos/part-00000.parquet", "record") in _kinds(verify_dataset(ds))


def test_duplicate_uri_across_shards_flags_the_later_shard(tmp_path):
    out = _build(tmp_path / "out", shards=(("a", "b"),))
    with ShardWriter(out) as w:
        w.commit(*_tables([("a2", _uri("a")), ("f", _uri("f"))]))  # same input, other content id
    r = verify_dataset(out)
    assert _kinds(r) == {("part-00001", "_commits/part-00001.json", "duplicate")}
    assert r.rerun_uris == [_uri("f")]  # /videos/a.mp4 stays committed in part-00000


def test_duplicate_clip_id_across_shards(tmp_path):
    out = _build(tmp_path / "out", shards=(("a",),))
    with ShardWriter(out) as w:
        w.commit(*_tables([("a", "/copy/a.mp4")]))
    r = verify_dataset(out)
    assert _kinds(r) == {("part-00001", "clips/part-00001.parquet", "duplicate")}
    assert r.rerun_uris == ["/copy/a.mp4"]


def test_leftovers_are_warnings_and_repair_cleans_them(ds):
    (ds / "clips" / ".part-00007.parquet.tmp").write_bytes(b"half")
    (ds / ".run.json.tmp").write_text("{")
    (ds / "_tmp_dedup").mkdir()
    (ds / "_tmp_dedup" / "emb-0.f32").write_bytes(b"\0" * 8)
    (ds / "clips" / "part-00000.r3.parquet").write_bytes((ds / "clips" / "part-00000.parquet").read_bytes())
    r = verify_dataset(ds)
    assert r.ok and not r.clean
    assert {(w.path, w.kind) for w in r.leftovers} == {
        ("clips/.part-00007.parquet.tmp", "temp"), (".run.json.tmp", "temp"), ("_tmp_dedup", "tmp_dedup"),
        ("clips/part-00000.r3.parquet", "unreferenced")}
    assert "--repair" in r.format()
    rep = repair_dataset(ds, r)
    assert not rep.reverified and not rep.quarantined_shards and not rep.rerun_uris
    assert sorted(rep.removed) == [".run.json.tmp", "_tmp_dedup", "clips/.part-00007.parquet.tmp"]
    assert rep.moved == rep.unreferenced == ["clips/part-00000.r3.parquet"]
    assert "1 unreferenced file(s)" in rep.format()
    assert (ds / rep.quarantine_dir / "clips" / "part-00000.r3.parquet").exists()  # never deleted
    assert verify_dataset(ds).clean


def test_committed_file_under_its_temporary_name_is_rolled_forward(ds):
    (ds / "clips" / "part-00001.parquet").rename(ds / "clips" / ".part-00001.parquet.tmp")
    r = verify_dataset(ds)
    assert r.ok and [(w.path, w.kind) for w in r.leftovers] == [("clips/.part-00001.parquet.tmp", "pending")]
    rep = repair_dataset(ds)
    assert rep.rolled_forward == ["clips/part-00001.parquet"] and rep.quarantine_dir is None
    assert verify_dataset(ds).clean


def test_repair_quarantines_broken_shards_and_a_rerun_redoes_exactly_their_inputs(tmp_path):
    out = _build(tmp_path / "out", shards=(("a", "b"), ("c", "d"), ("e",), ("g",), ("h",)))
    clip = out / "clips" / "part-00001.parquet"
    data = bytearray(clip.read_bytes())
    data[len(data) // 2] ^= 0x01
    clip.write_bytes(bytes(data))  # checksum
    (out / "videos" / "part-00002.parquet").unlink()  # missing
    (out / "_commits" / "part-00003.json").write_text("not json")  # record
    (out / "clips" / ".part-00009.parquet.tmp").write_bytes(b"half")  # leftover
    report = verify_dataset(out)
    assert report.broken_shards == ["part-00001", "part-00002", "part-00003"]
    affected = [_uri(v) for v in "cdeg"]
    assert report.rerun_uris == affected

    rep = repair_dataset(out, report)
    assert rep.quarantined_shards == report.broken_shards and rep.rerun_uris == affected
    assert rep.removed == ["clips/.part-00009.parquet.tmp"]
    q = out / rep.quarantine_dir
    assert q.parent.name == QUARANTINE
    for rel in ("clips/part-00001.parquet", "videos/part-00001.parquet", "_commits/part-00001.json",
                "clips/part-00002.parquet", "_commits/part-00002.json", "videos/part-00003.parquet",
                "clips/part-00003.parquet", "_commits/part-00003.json"):
        assert (q / rel).exists(), rel
        assert not (out / rel).exists(), rel
    manifest = json.loads((q / "quarantine.json").read_text())
    assert manifest["rerun_uris"] == affected and {w["kind"] for w in manifest["why"]} == {
        "checksum", "missing", "record"}
    after = verify_dataset(out)
    assert after.clean, after.format()
    assert sorted(read_table(out, "videos")["video_id"].to_pylist()) == ["a", "b", "h"]
    assert set(read_table(out, "clips")["video_id"].to_pylist()) == {"a", "b", "h"}
    uris, _ = committed_keys(out)
    assert uris == {_uri("a"), _uri("b"), _uri("h")}
    assert not uris & set(rep.rerun_uris)  # so a rerun of the same inputs processes exactly these
    assert "re-processes these 4 input(s)" in rep.format()

    again = repair_dataset(out)
    assert not again.changed and again.quarantine_dir is None
    assert len(list((out / QUARANTINE).iterdir())) == 1
    assert "nothing to repair" in again.format()

    with ShardWriter(out) as w:  # what the rerun does: commit the re-processed inputs
        w.commit(*_tables([(v, _uri(v)) for v in "cdeg"]))
    assert verify_dataset(out).clean
    assert committed_keys(out)[0] == {_uri(v) for v in "abcdegh"}


def test_repair_after_duplicate_keeps_the_earlier_shard(tmp_path):
    out = _build(tmp_path / "out", shards=(("a", "b"),))
    with ShardWriter(out) as w:
        w.commit(*_tables([("a2", _uri("a")), ("f", _uri("f"))]))
    rep = repair_dataset(out)
    assert rep.quarantined_shards == ["part-00001"] and rep.rerun_uris == [_uri("f")]
    assert [r.shard for r in read_commits(out)] == ["part-00000"]
    assert verify_dataset(out).clean


def test_stale_report_is_verified_again_and_a_writer_blocks_repair(ds):
    report = verify_dataset(ds, checksums=False)
    with ShardWriter(ds) as w:
        assert verify_dataset(ds, checksums=False).writer_active
        with pytest.raises(DatasetError, match="another clipmill run"):
            repair_dataset(ds)
        w.commit(*_tables([("x", _uri("x"))]))
    rep = repair_dataset(ds, report)
    assert rep.reverified and not rep.changed


def test_damaged_run_json_is_reported_and_repair_says_what_to_do(ds):
    (ds / "run.json").write_text("{")
    r = verify_dataset(ds)
    assert ("run.json", "record") in {(p.file, p.kind) for p in r.problems} and "mv " in r.format()
    with pytest.raises(DatasetError, match="move it aside"):
        repair_dataset(ds)


def test_dedup_rewritten_shards_verify_fine(tmp_path):
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        w.commit(*_tables([("a", _uri("a")), ("b", _uri("b"))], embedding=[1.0, 0.0, 0.0, 0.0]))
        w.commit(*_tables([("c", _uri("c"))], embedding=[0.0, 1.0, 0.0, 0.0]))
    assert TMP_DEDUP == TMP_DIR
    assert dedup_dataset(out).shards_rewritten >= 1
    paths = [r.files["clips"].path for r in read_commits(out)]
    assert "clips/part-00000.r1.parquet" in paths
    r = verify_dataset(out)
    assert r.clean, r.format()


def test_not_a_dataset_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="not a clipmill dataset"):
        verify_dataset(tmp_path / "x")
    with pytest.raises(DatasetError, match="not a clipmill dataset"):
        repair_dataset(tmp_path / "x")
