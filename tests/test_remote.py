"""Remote storage: fsspec inputs (memory://, s3:// on a local moto server), a remote OUT published commit by
commit (data first, record last), resume after a publish that broke half-way, credentials kept out of OUT."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from clipmill import synth
from clipmill.pipeline.inputs import InputError, expand_inputs
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import redact_argv, run
from clipmill.stages.probe import Probe
from clipmill.stages.split import Split, SplitConfig
from clipmill.stages.transcode import Transcode
from clipmill.storage import remote
from clipmill.storage.ids import video_id_from_path
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import (
    COMMITS,
    DatasetError,
    ShardWriter,
    read_commits,
    read_run_json,
    read_table,
)

SECRET = "moto-secret-9f3c2e71"  # what the tests pass as the S3 secret key; must appear nowhere in OUT


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("remote-src")
    return {"cuts": _make(d, "cuts"), "flash": _make(d, "flash")}


def _make(d: Path, case: str) -> Path:
    p = d / f"{case}.mp4"
    synth.make_case(case, p, width=160, height=96)
    return p


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/clipmill-test-{os.getpid()}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------------------------------------- inputs
def test_expand_remote_prefix_glob_manifest_and_errors(memfs):
    fs, root = memfs
    for name in ("raw/a.mp4", "raw/sub/b.MOV", "raw/notes.txt", "raw/.hidden.mp4"):
        fs.pipe_file(f"{root}/{name}", b"x")
    fs.pipe_file(f"{root}/m/list.jsonl", (json.dumps({"uri": "../raw/a.mp4", "caption": "a cat"}) + "\n"
                                          + json.dumps({"uri": "s3://other-bucket/x.mp4"}) + "\n").encode())
    base = f"memory://{root}"
    assert [i.uri for i in expand_inputs([f"{base}/raw/"])] == [f"memory://{root}/raw/a.mp4",
                                                               f"memory://{root}/raw/sub/b.MOV"]
    assert [i.uri for i in expand_inputs([f"{base}/raw/*.mp4"])] == [f"memory://{root}/raw/a.mp4"]
    got = expand_inputs([f"{base}/m/list.jsonl", f"{base}/raw/a.mp4", f"{base}/raw/missing.mp4"])
    assert [(i.uri, i.source_caption) for i in got] == [
        (f"memory://{root}/raw/a.mp4", "a cat"), ("s3://other-bucket/x.mp4", None),
        (f"memory://{root}/raw/missing.mp4", None)]  # a missing object is ledgered later (not_found)
    with pytest.raises(InputError, match="unsupported URL scheme 'nosuch'"):
        expand_inputs(["nosuch://bucket/x.mp4"])


def test_storage_options_from_env(monkeypatch):
    monkeypatch.setenv(remote.STORAGE_OPTIONS_ENV, json.dumps({"anon": True, "s3": {"endpoint_url": "http://h:1"}}))
    assert remote.storage_options("s3") == {"endpoint_url": "http://h:1"}
    assert remote.storage_options("gs") == {"anon": True}
    monkeypatch.setenv(remote.STORAGE_OPTIONS_ENV, "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        remote.storage_options("s3")
    assert remote.file_url_path("file:///data/a%20b") == "/data/a b" and not remote.is_remote("file:///x")
    assert remote.is_remote("s3://b/k") and remote.is_remote("gs://b/k") and not remote.is_remote("/x/y")
    assert redact_argv(["run", "x", "--storage-options", '{"secret": "s"}', "--storage-options={}"]) == [
        "run", "x", "--storage-options", "<redacted>", "--storage-options=<redacted>"]


def test_stages_read_fsspec_urls_like_local_files(videos, memfs):
    """Probe, split and transcode on a memory:// copy give the same ids, spans and frame counts as the file."""
    fs, root = memfs
    src = videos["cuts"]
    fs.pipe_file(f"{root}/v/cuts.mp4", src.read_bytes())
    uris = [str(src), f"memory://{root}/v/cuts.mp4", f"memory://{root}/v/none.mp4", f"memory://{root}/v"]
    probed = Probe()(pa.table({"uri": uris})).to_pylist()
    assert [r["status"] for r in probed] == ["done", "done", "rejected", "rejected"]
    assert [r["reason"] for r in probed[2:]] == ["not_found", "not_a_file"]
    assert probed[0]["video_id"] == probed[1]["video_id"] == video_id_from_path(str(src))
    for key in ("n_frames", "fps", "width", "height", "duration_s", "size_bytes", "container", "codec"):
        assert probed[0][key] == probed[1][key], key
    split = [Split(SplitConfig(min_s=1.0, max_s=3.0))(pa.Table.from_pylist([r])) for r in probed[:2]]
    assert split[0]["clip_id"].to_pylist() == split[1]["clip_id"].to_pylist()
    assert split[0].num_rows >= 3
    cut = [Transcode()(t.slice(0, 2)) for t in split]
    assert cut[0]["clip_n_frames"].to_pylist() == cut[1]["clip_n_frames"].to_pylist()
    assert cut[1]["error"].to_pylist() == [None, None]
    assert all(m[4:8] == b"ftyp" for m in cut[1]["media"].to_pylist())


# ------------------------------------------------------------------------------- remote dataset mirror
def _commit(out: Path, uri: str, vid: str) -> str:
    with ShardWriter(out) as w:
        videos = pa.Table.from_pylist([{"video_id": vid, "uri": uri, "status": "rejected", "reason": "test",
                                        "n_clips": 0, "n_kept": 0}], schema=VIDEOS_SCHEMA)
        return w.commit(videos, CLIPS_SCHEMA.empty_table()).shard


def test_remote_mirror_publishes_records_last_and_drops_unpublished(memfs, tmp_path, monkeypatch):
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    fs, root = memfs
    url = f"memory://{root}/ds"
    staging = tmp_path / "staging"
    rds = remote.RemoteDataset(url)
    rds.pull(staging, data=False)
    first = _commit(staging, "a.mp4", "v1")
    rds.publish_commit(staging, first)
    assert fs.exists(f"{root}/ds/{COMMITS}/{first}.json") and fs.exists(f"{root}/ds/videos/{first}.parquet")
    # a second commit whose publish stopped after the data files: the remote has no record of it
    second = _commit(staging, "b.mp4", "v2")
    fs.put_file(str(staging / "videos" / f"{second}.parquet"), f"{root}/ds/videos/{second}.parquet")
    copy = remote.local_copy(url)
    assert [r.uris for r in read_commits(copy)] == [["a.mp4"]]
    assert read_table(copy, "videos")["uri"].to_pylist() == ["a.mp4"]
    # resume: the staging copy follows the remote, so the unpublished commit is dropped and runs again
    rds2 = remote.RemoteDataset(url)
    rds2.pull(staging, data=False)
    assert [r.shard for r in read_commits(staging)] == [first]
    assert not (staging / "videos" / f"{second}.parquet").exists()
    rds2.push(staging, prune=True)  # the orphan data file on the remote is removed
    assert not fs.exists(f"{root}/ds/videos/{second}.parquet")
    third = _commit(staging, "b.mp4", "v2")
    rds2.publish_commit(staging, third)
    assert [r.uris for r in read_commits(remote.local_copy(url))] == [["a.mp4"], ["b.mp4"]]
    # a whole-dataset step rewrites a shard under a new name and replaces its record (as dedup does): the push
    # uploads the new file, then the record, then deletes the old file
    rec_path = staging / COMMITS / f"{first}.json"
    rec = json.loads(rec_path.read_text())
    old, new = rec["files"]["videos"]["path"], f"videos/{first}.r1.parquet"
    shutil.copy(staging / old, staging / new)
    rec["files"]["videos"]["path"] = new
    rec_path.write_text(json.dumps(rec))
    (staging / old).unlink()
    assert rds2.push(staging) == 1
    assert fs.exists(f"{root}/ds/{new}") and not fs.exists(f"{root}/ds/{old}")
    copy = remote.local_copy(url)
    assert read_table(copy, "videos")["uri"].to_pylist() == ["a.mp4", "b.mp4"]
    assert not (copy / old).exists()  # the reader's copy follows too
    with pytest.raises(DatasetError, match="not a clipmill dataset"):
        remote.local_copy(f"memory://{root}/nothing-here")


# ------------------------------------------------------------------------------ s3:// end to end (moto)
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (random port) and the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "moto-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           remote.CACHE_ENV: str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("clipmill-in")
    fs.mkdir("clipmill-out")
    try:
        yield fs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def small_recipe(small_recipe_path):
    """The session's small recipe (default without OCR/NSFW/motion, short clips, one video per shard)."""
    return load_recipe(small_recipe_path)


def _summary(out: Path) -> tuple[list, list]:
    # a content id for read bytes; an unreadable input's id comes from its uri, which differs by design
    v = sorted((Path(r["uri"]).name, r["video_id"] if r["size_bytes"] else None, r["status"], r["reason"],
                r["n_frames"], r["n_clips"]) for r in read_table(out, "videos").to_pylist())
    c = sorted((r["clip_id"], r["n_frames"], r["kept"], r["media"] is not None)
               for r in read_table(out, "clips").to_pylist())
    return v, c


def _tree_bytes(fs, prefix: str) -> bytes:
    return b"".join(fs.cat_file(p) for p in fs.find(prefix))


@pytest.mark.slow
def test_s3_inputs_into_s3_out_equal_a_local_run(ray_session, s3, videos, small_recipe, tmp_path, monkeypatch):
    for name, p in videos.items():
        s3.put_file(str(p), f"clipmill-in/raw/{name}.mp4")
    local_dir = tmp_path / "local-in"
    local_dir.mkdir()
    for name, p in videos.items():
        shutil.copy(p, local_dir / f"{name}.mp4")
    remote_items = expand_inputs(["s3://clipmill-in/raw/", "s3://clipmill-in/raw/gone.mp4"])
    assert [i.uri for i in remote_items] == ["s3://clipmill-in/raw/cuts.mp4", "s3://clipmill-in/raw/flash.mp4",
                                             "s3://clipmill-in/raw/gone.mp4"]
    ref = tmp_path / "ref"
    run(expand_inputs([str(local_dir), str(local_dir / "gone.mp4")]), ref, small_recipe)

    # options through CLIPMILL_STORAGE_OPTIONS (what --storage-options sets): the secret again, per protocol
    monkeypatch.setenv(remote.STORAGE_OPTIONS_ENV, json.dumps({"s3": {"key": "moto-key", "secret": SECRET}}))
    out = "s3://clipmill-out/ds"
    argv = ["run", "s3://clipmill-in/raw/", "-o", out, "--storage-options", json.dumps({"secret": SECRET})]
    # the second commit's publish breaks after its data files are uploaded: nothing of it is visible remotely
    real = remote.RemoteDataset.publish_commit
    calls = []

    def flaky(self, local, shard, **kw):
        calls.append(shard)
        if len(calls) == 2:
            for sf in json.loads((Path(local) / COMMITS / f"{shard}.json").read_text())["files"].values():
                self.fs.put_file(str(Path(local) / sf["path"]), self._path(sf["path"]))
            raise DatasetError("publish interrupted (test)")
        return real(self, local, shard, **kw)

    monkeypatch.setattr(remote.RemoteDataset, "publish_commit", flaky)
    with pytest.raises(DatasetError, match="interrupted"):
        run(remote_items, out, small_recipe, argv=argv)
    monkeypatch.setattr(remote.RemoteDataset, "publish_commit", real)
    published = read_commits(remote.local_copy(out))
    assert len(published) == 1
    first = Path(published[0].uris[0]).name
    stats = run(remote_items, out, small_recipe, argv=argv)  # resume
    assert stats.skipped == 1 and stats.total == 2

    staging = remote.RemoteDataset(out).local_dir("staging")
    assert len(read_commits(staging)) == 3 and not list(staging.glob("*/*.parquet"))  # published: records only
    copy = remote.local_copy(out, fresh=True)
    assert _summary(copy) == _summary(ref)
    v, c = _summary(copy)
    assert [row[2:4] for row in v if row[0] == "gone.mp4"] == [("rejected", "not_found")]
    assert len(c) >= 4 and any(kept for _, _, kept, _ in c)
    assert {r.shard for r in read_commits(copy)} == {p.rsplit("/", 1)[-1][:-5] for p in s3.ls(f"clipmill-out/ds/{COMMITS}")}
    meta = read_run_json(copy)
    metrics = meta["runs"][-1]["metrics"]
    n_other = next(row[5] for row in v if row[0] not in (first, "gone.mp4"))
    assert metrics["stages"]["probe"]["rows_in"] == metrics["stages"]["split"]["rows_in"] == 2  # other + gone
    assert metrics["stages"]["split"]["rows_out"] == n_other + 1 and metrics["videos_in_ray_max"] == 2
    assert meta["runs"][-1]["global_steps"]["dedup"]["clips"] == len(c)
    # no credential in OUT: neither the remote objects nor the local staging/read copies
    for blob in (_tree_bytes(s3, "clipmill-out"), *(p.read_bytes() for p in Path(os.environ[remote.CACHE_ENV])
                                                   .rglob("*") if p.is_file())):
        assert SECRET.encode() not in blob
    assert "<redacted>" in meta["runs"][-1]["argv"]

    # the read-only tools work on the remote OUT through a local copy
    from click.testing import CliRunner

    from clipmill.pipeline.cli import main

    res = CliRunner().invoke(main, ["sql", out, "SELECT count(*) AS n FROM clips", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == ["n", str(len(c))]
    res = CliRunner().invoke(main, ["verify", out])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["verify", out, "--repair"])
    assert res.exit_code == 2 and "local OUT only" in res.output
