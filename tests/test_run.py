"""End-to-end runs through Ray on generated, real and broken videos: ledger, clips, resume, failures, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import yaml

from clipmill import badfiles, synth
from clipmill.pipeline.inputs import expand_inputs
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import run
from clipmill.storage.shards import read_commits, read_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "clipmill"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of inputs: synthetic shots, real samples, broken files and a byte-identical copy."""
    d = tmp_path_factory.mktemp("corpus")
    truth = {}
    for case in ("cuts", "dissolve", "flash"):
        truth[case] = synth.make_case(case, d / f"{case}.mp4", width=320, height=180)
    for name in ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"):
        shutil.copy(REPO / "samples" / name, d / name)
    shutil.copy(d / "cuts.mp4", d / "cuts_copy.mp4")
    bad = d / "bad"
    broken = {
        "empty": badfiles.make_empty(bad),
        "text": badfiles.make_text(bad),
        "truncated": badfiles.make_truncated(bad),
        "audio": badfiles.make_audio_only(bad),
    }
    return {"dir": d, "truth": truth, "broken": broken}


@pytest.fixture(scope="session")
def recipe_path(tmp_path_factory):
    """The default recipe with shorter clips (the generated shots are 1.2-2 s) and one video per shard."""
    data = load_recipe("default").to_json()
    data.pop("source")
    for st in data["stages"]:
        if "split" in st:
            st["split"].update(min_s=1.0, max_s=3.0)
        if "transcode" in st:
            st["transcode"].update(max_side=256)
        if "filter" in st:
            st["filter"].update(min_sharpness=None)  # the default is calibrated for max_side 512
    data["write"]["shard_videos"] = 1
    p = tmp_path_factory.mktemp("recipe") / "test.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="session")
def clean_run(ray_session, corpus, recipe_path, tmp_path_factory):
    """One uninterrupted run over the corpus (the reference the other tests compare with)."""
    out = tmp_path_factory.mktemp("clean") / "ds"
    items = expand_inputs([str(corpus["dir"])])
    stats = run(items, out, load_recipe(recipe_path))
    return {"out": out, "stats": stats, "items": items}


def _decode_all(media: bytes) -> list[np.ndarray]:
    import io

    with av.open(io.BytesIO(media)) as c:
        return [f.to_ndarray(format="gray") for f in c.decode(video=0)]


def test_every_input_ledgered_once_with_status(clean_run, corpus):
    out, items = clean_run["out"], clean_run["items"]
    videos = read_table(out, "videos").to_pylist()
    uris = [v["uri"] for v in videos]
    assert sorted(uris) == sorted(i.uri for i in items)
    assert len(set(uris)) == len(uris)
    by_name = {Path(v["uri"]).name: v for v in videos}
    for name in ("empty.mp4", "notes.mp4", "truncated.mp4"):
        assert by_name[name]["status"] == "rejected" and by_name[name]["reason"], name
    audio = by_name[corpus["broken"]["audio"].name]
    assert audio["status"] == "rejected" and "no_video" in audio["reason"]
    assert by_name["cuts_copy.mp4"]["status"] == "rejected" or by_name["cuts.mp4"]["status"] == "rejected"
    dup = by_name["cuts_copy.mp4"] if by_name["cuts_copy.mp4"]["status"] == "rejected" else by_name["cuts.mp4"]
    assert dup["reason"].startswith("duplicate_content")
    for name in ("bikes.mp4", "dissolve.mp4", "flash.mp4", "carphone_pristine.mp4"):
        assert by_name[name]["status"] == "done", by_name[name]
    assert by_name["bikes.mp4"]["cuts"] == pytest.approx([30, 76, 137, 187, 242], abs=1)
    assert by_name["bikes.mp4"]["n_frames"] == 250
    diss = corpus["truth"]["dissolve"]["transitions"]
    found = by_name["dissolve.mp4"]["transitions"]
    assert all(any(a <= t1 and t0 <= b for a, b in found) for t0, t1 in diss)


def test_clips_are_frame_exact_and_unique(clean_run, testdata):
    out = clean_run["out"]
    clips = read_table(out, "clips").to_pylist()
    ledger = read_table(out, "videos").to_pylist()
    videos = {v["video_id"]: v for v in ledger if v["status"] == "done"}
    ids = [c["clip_id"] for c in clips]
    assert len(ids) == len(set(ids)) and len(ids) > 10
    assert sum(v["n_clips"] for v in ledger) == len(clips)
    for c in clips:
        v = videos[c["video_id"]]
        assert v["status"] == "done"
        assert c["n_frames"] == c["end_frame"] - c["start_frame"]
        assert 1.0 - 1e-6 <= c["duration_s"] <= 3.0 + 1e-6
        for cut in v["cuts"]:
            assert not (c["start_frame"] < cut < c["end_frame"]), (c["clip_id"], cut)
        assert c["thumbnail"][:2] == b"\xff\xd8"
        if c["kept"]:
            frames = _decode_all(c["media"])
            assert len(frames) == c["n_frames"]
        else:
            assert c["media"] is None and c["reject_reasons"]
    # the clip of bikes.mp4 between the cuts at 30 and 76 starts at 32 (2 trimmed frames) and matches the source
    bikes = [c for c in clips if c["uri"].endswith("bikes.mp4") and c["start_frame"] == 32]
    assert len(bikes) == 1 and bikes[0]["end_frame"] == 74
    assert bikes[0]["kept"], bikes[0]["reject_reasons"]
    with av.open(str(testdata / "bikes.mp4")) as src:
        ref = {i: f.to_ndarray(format="gray") for i, f in enumerate(src.decode(video=0)) if i in (31, 32, 73, 74)}
    got = _decode_all(bikes[0]["media"])
    h, w = ref[32].shape

    def dist(a, b):
        return np.abs(cv2.resize(a, (w, h)).astype(float) - b.astype(float)).mean()

    assert dist(got[0], ref[32]) < dist(got[0], ref[31])
    assert dist(got[-1], ref[73]) < dist(got[-1], ref[74])


def test_quality_filter_rejects_the_distorted_carphone(clean_run):
    clips = read_table(clean_run["out"], "clips").to_pylist()
    pristine = [c for c in clips if c["uri"].endswith("carphone_pristine.mp4")]
    distorted = [c for c in clips if c["uri"].endswith("carphone_distorted.mp4")]
    assert pristine and distorted
    assert min(c["sharpness"] for c in pristine) > max(c["sharpness"] for c in distorted)


def test_run_json_and_rerun_resumes_without_duplicates(clean_run, recipe_path):
    out, items = clean_run["out"], clean_run["items"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"].startswith("1.")
    assert meta["counts"]["videos"] == len(items)
    shards_before = len(read_commits(out))
    stats = run(items, out, load_recipe(recipe_path))
    assert stats.skipped == len(items) and stats.total == 0
    assert len(read_commits(out)) == shards_before


def test_a_stage_raising_fails_only_that_video(ray_session, corpus, recipe_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPMILL_FAULT_INJECT", "transcode:flash.mp4")
    items = expand_inputs([str(corpus["dir"] / n) for n in ("flash.mp4", "bikes.mp4")])
    run(items, tmp_path / "ds", load_recipe(recipe_path))
    videos = {Path(v["uri"]).name: v for v in read_table(tmp_path / "ds", "videos").to_pylist()}
    assert videos["flash.mp4"]["status"] == "failed"
    assert videos["flash.mp4"]["reason"].startswith("transcode: InjectedFault")
    assert videos["bikes.mp4"]["status"] == "done" and videos["bikes.mp4"]["n_clips"] > 0
    clips = read_table(tmp_path / "ds", "clips").to_pylist()
    assert {Path(c["uri"]).name for c in clips} == {"bikes.mp4"}


def _cli(args, env, **kw):
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_cli_run_sql_stats_detect(ray_session, corpus, recipe_path, tmp_path, clipmill_env, testdata):
    out = tmp_path / "ds"
    res = _cli(["run", str(corpus["dir"] / "bikes.mp4"), str(corpus["broken"]["empty"]), "-o", str(out),
                "--recipe", str(recipe_path), "--address", ray_session], clipmill_env)
    assert res.returncode == 0, res.stderr
    assert "videos: 1 done, 1 rejected, 0 failed" in res.stdout
    assert "empty_file" in res.stdout
    res = _cli(["sql", str(out), "SELECT count(*) AS n FROM clips WHERE kept", "--format", "json"], clipmill_env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["n"] >= 1
    res = _cli(["sql", str(out), f"COPY clips TO '{out}/leak.csv'"], clipmill_env)
    assert res.returncode != 0 and not (out / "leak.csv").exists()
    res = _cli(["stats", str(out)], clipmill_env)
    assert res.returncode == 0 and "rejected" in res.stdout
    res = _cli(["detect", "--json", str(testdata / "counter.mp4"), str(corpus["broken"]["text"])], clipmill_env)
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert lines[0]["cuts"] == [10, 20] and lines[0]["n_frames"] == 30 and lines[0]["fps"] == 10
    assert "error" in lines[1]


def test_cli_refuses_what_cannot_run(tmp_path, clipmill_env, corpus):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nstages: [probe, {split: {min_s: -3}}]\n")
    res = _cli(["run", str(corpus["dir"]), "-o", str(tmp_path / "o"), "--recipe", str(bad)], clipmill_env)
    assert res.returncode == 2 and "stages[1].split.min_s" in res.stderr
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text('{"schema_version": "0.3"}')
    res = _cli(["run", str(corpus["dir"]), "-o", str(old)], clipmill_env)
    assert res.returncode == 2 and "schema 0.3" in res.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = _cli(["run", str(corpus["dir"]), "-o", str(blocker / "o")], clipmill_env)
    assert res.returncode == 2 and "cannot write" in res.stderr
    res = _cli(["run", str(corpus["dir"]), "-o", str(tmp_path / "o2"), "--address", "127.0.0.1:1"], clipmill_env)
    assert res.returncode == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in res.stderr


def test_kill_9_then_rerun_equals_clean_run(ray_session, clean_run, corpus, recipe_path, tmp_path, clipmill_env):
    out = tmp_path / "ds"
    args = ["run", str(corpus["dir"]), "-o", str(out), "--recipe", str(recipe_path), "--address", ray_session]
    proc = subprocess.Popen(CLI + args, env=clipmill_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(read_commits(out)) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_at_kill = len(read_commits(out))
    assert 0 < n_at_kill < len(clean_run["items"]), "the kill should land mid-run"
    res = _cli(args, clipmill_env)
    assert res.returncode == 0, res.stderr
    got = read_table(out, "clips")["clip_id"].to_pylist()
    want = read_table(clean_run["out"], "clips")["clip_id"].to_pylist()
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(want)
    vids = read_table(out, "videos")["uri"].to_pylist()
    assert sorted(vids) == sorted(i.uri for i in clean_run["items"])
    assert not list(out.rglob(".*.tmp"))


def test_limit_then_resume_covers_every_input_once(ray_session, clean_run, recipe_path, tmp_path):
    items, out = clean_run["items"], tmp_path / "ds"
    first = run(items, out, load_recipe(recipe_path), limit=3)
    assert first.total == 3 and first.videos == 3
    second = run(items, out, load_recipe(recipe_path))
    assert second.skipped == 3 and second.videos == len(items) - 3
    uris = read_table(out, "videos")["uri"].to_pylist()
    assert sorted(uris) == sorted(i.uri for i in items)
    got = sorted(read_table(out, "clips")["clip_id"].to_pylist())
    assert got == sorted(read_table(clean_run["out"], "clips")["clip_id"].to_pylist())


def test_reencoded_rescaled_copy_is_marked_duplicate_across_videos(ray_session, recipe_path, tmp_path, testdata):
    """A clip re-encoded at half size under another name is `duplicate_of` the original; other scenes are not."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(testdata / "bikes.mp4", src / "bikes.mp4")
    with av.open(str(testdata / "bikes.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24", width=320, height=136) for f in c.decode(video=0)]
    synth.write_video(src / "bikes_small_reupload.mp4", frames, 25, options={"crf": "30", "preset": "veryfast"})
    synth.make_case("cuts", src / "other.mp4", width=320, height=180)
    out = tmp_path / "ds"
    run(expand_inputs([str(src)]), out, load_recipe(recipe_path))
    clips = read_table(out, "clips").to_pylist()
    by_id = {c["clip_id"]: c for c in clips}
    small = [c for c in clips if c["uri"].endswith("bikes_small_reupload.mp4")]
    assert small and all(c["duplicate_of"] for c in small)
    for c in small:
        best = by_id[c["duplicate_of"]]
        assert best["uri"].endswith("bikes.mp4") and best["start_frame"] == c["start_frame"]
        assert best["duplicate_of"] is None
    assert all(c["duplicate_of"] is None for c in clips if c["uri"].endswith("other.mp4"))
    meta = json.loads((out / "run.json").read_text())
    assert meta["runs"][-1]["global_steps"]["dedup"]["duplicates"] == len(small)


def test_hanging_stage_times_out_and_nan_score_fails_the_video(ray_session, corpus, recipe_path, tmp_path,
                                                                monkeypatch):
    data = yaml.safe_load(recipe_path.read_text())
    data["runtime"]["video_timeout_s"] = 4
    rp = tmp_path / "timeout.yaml"
    rp.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CLIPMILL_FAULT_INJECT", "split:hang:flash.mp4;quality:nan:bikes.mp4")
    items = expand_inputs([str(corpus["dir"] / n) for n in ("flash.mp4", "bikes.mp4", "dissolve.mp4")])
    t0 = time.monotonic()
    run(items, tmp_path / "ds", load_recipe(rp))
    assert time.monotonic() - t0 < 120
    videos = {Path(v["uri"]).name: v for v in read_table(tmp_path / "ds", "videos").to_pylist()}
    assert videos["flash.mp4"]["status"] == "failed"
    assert videos["flash.mp4"]["reason"].startswith("split: StageTimeout: exceeded 4 s")
    assert videos["bikes.mp4"]["status"] == "failed"
    assert "brightness is nan" in videos["bikes.mp4"]["reason"]
    assert videos["dissolve.mp4"]["status"] == "done"


def test_sigterm_commits_finished_videos_and_rerun_completes(ray_session, clean_run, corpus, recipe_path, tmp_path,
                                                            clipmill_env):
    out = tmp_path / "ds"
    args = ["run", str(corpus["dir"]), "-o", str(out), "--recipe", str(recipe_path), "--address", ray_session]
    proc = subprocess.Popen(CLI + args, env=clipmill_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(read_commits(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Run the same command again" in err
    assert not list(out.rglob(".*.tmp"))
    res = _cli(args, clipmill_env)
    assert res.returncode == 0, res.stderr
    got = sorted(read_table(out, "clips")["clip_id"].to_pylist())
    assert got == sorted(read_table(clean_run["out"], "clips")["clip_id"].to_pylist())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 384 KB tmpfs (needs root, as in CI); yields its path and unmounts afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_a_clear_error_and_rerun_after_space_frees_completes(
        ray_session, clean_run, corpus, recipe_path, small_tmpfs, clipmill_env):
    out = small_tmpfs / "ds"
    data = yaml.safe_load(recipe_path.read_text())
    data["write"]["media"] = "all"  # enough bytes to overflow 384 KB within a few shards
    rp = small_tmpfs.parent / "all.yaml"
    rp.write_text(yaml.safe_dump(data))
    args = ["run", str(corpus["dir"]), "-o", str(out), "--recipe", str(rp), "--address", ray_session]
    res = _cli(args, clipmill_env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "No space left on device" in res.stderr and "run the same command again" in res.stderr
    assert not list(out.rglob(".*.tmp"))  # nothing half-written is left, nothing half-visible
    committed = read_table(out, "clips")["clip_id"].to_pylist()  # every committed shard still reads
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_tmpfs)], check=True)
    res = _cli(args, clipmill_env)
    assert res.returncode == 0, res.stderr
    got = read_table(out, "clips")["clip_id"].to_pylist()
    assert set(committed) <= set(got) and len(got) == len(set(got))
    assert sorted(got) == sorted(read_table(clean_run["out"], "clips")["clip_id"].to_pylist())


def test_corrupted_shard_is_found_by_verify_and_run_repair_restores_it(ray_session, clean_run, corpus, recipe_path,
                                                                       tmp_path, clipmill_env):
    out = tmp_path / "ds"
    shutil.copytree(clean_run["out"], out)
    res = _cli(["verify", str(out)], clipmill_env)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = [r for r in read_commits(out) if r.files["clips"].rows][0]
    victim = out / rec.files["clips"].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = _cli(["verify", str(out)], clipmill_env)
    assert res.returncode == 1
    assert rec.shard in res.stdout and "checksum" in res.stdout
    args = ["run", str(corpus["dir"]), "-o", str(out), "--recipe", str(recipe_path), "--address", ray_session,
            "--repair"]
    res = _cli(args, clipmill_env)
    assert res.returncode == 0, res.stderr
    assert _cli(["verify", str(out)], clipmill_env).returncode == 0
    got = sorted(read_table(out, "clips")["clip_id"].to_pylist())
    assert got == sorted(read_table(clean_run["out"], "clips")["clip_id"].to_pylist())
    assert list((out / "_quarantine").rglob("*.parquet"))
