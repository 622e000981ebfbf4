"""Atomic shard commits, recovery after a crash at each step, the write lock, schema-version refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.storage import shards
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import DatasetError, ShardWriter, committed_files, read_commits, read_table


def _tables(vid: str, n_clips: int = 2):
    videos = pa.Table.from_pylist([{"video_id": vid, "uri": f"/v/{vid}.mp4", "status": "done", "n_clips": n_clips}],
                                  schema=VIDEOS_SCHEMA)
    clips = pa.Table.from_pylist(
        [{"clip_id": f"{vid}-{i}", "video_id": vid, "media": b"x" * 10, "kept": True} for i in range(n_clips)],
        schema=CLIPS_SCHEMA)
    return videos, clips


def test_commit_writes_files_and_record(tmp_path):
    with ShardWriter(tmp_path / "out") as w:
        rec = w.commit(*_tables("a"))
        w.commit(*_tables("b", 3))
    out = tmp_path / "out"
    assert rec.shard == "part-00000"
    assert (out / "videos" / "part-00000.parquet").exists()
    assert [r.video_ids for r in read_commits(out)] == [["a"], ["b"]]
    assert read_table(out, "clips").num_rows == 5
    assert pq.read_schema(out / "clips" / "part-00001.parquet").metadata[b"clipmill.schema_version"]
    assert not list(out.rglob(".*.tmp"))


def test_uncommitted_temporaries_are_removed_and_committed_rolled_forward(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        w.commit(*_tables("a"))
    # crash after the commit point, before the data files were renamed
    real_replace = os.replace
    calls = []

    def crash_on_data_rename(src, dst):
        calls.append(dst)
        if str(dst).endswith(".parquet"):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", crash_on_data_rename)
    with pytest.raises(KeyboardInterrupt), ShardWriter(out) as w:
        w.commit(*_tables("b"))
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert (out / "_commits" / "part-00001.json").exists()
    assert not (out / "clips" / "part-00001.parquet").exists()
    assert len(committed_files(out, "clips")) == 2  # readable through the temporary name already
    # a crash before the commit point leaves only hidden temporaries
    (out / "clips" / ".part-00002.parquet.tmp").write_bytes(b"half")
    (out / "videos" / "part-00003.parquet").write_bytes(b"stray")
    with ShardWriter(out) as w:
        rec = w.commit(*_tables("c"))
    assert rec.shard == "part-00004"
    assert (out / "clips" / "part-00001.parquet").exists()
    assert not (out / "clips" / ".part-00002.parquet.tmp").exists()
    assert not (out / "videos" / "part-00003.parquet").exists()
    assert sorted(read_table(out, "videos")["video_id"].to_pylist()) == ["a", "b", "c"]


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from clipmill.storage.shards import ShardWriter\n"
            "w = ShardWriter(sys.argv[1]); w.open(); print('locked', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DatasetError, match="being written by another clipmill run"):
            ShardWriter(out).open()
    finally:
        proc.kill()
        proc.wait()
    with ShardWriter(out):  # the lock dies with its holder
        pass


def test_incompatible_schema_version_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"schema_version": "99.0"}))
    with pytest.raises(DatasetError, match=r"schema 99\.0.*writes schema 1\."):
        ShardWriter(out).open()


def test_non_dataset_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a clipmill dataset"):
        ShardWriter(tmp_path).open()
    f = tmp_path / "afile"
    f.write_text("")
    with pytest.raises(DatasetError, match="not a directory"):
        ShardWriter(f).open()


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="cannot write to"):
        ShardWriter(blocker / "out").open()
