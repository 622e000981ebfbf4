"""Fault injection: every way a run can be hurt, and what must hold afterwards.

Each test injects one fault into real `clipmill run` processes (CLI subprocesses on real, generated and
broken videos) and checks the dataset against one uninterrupted run of the same command:

  worker SIGKILLed mid-stage (own local Ray) -> Ray retries the task; run exits 0, dataset = clean run
  driver killed at commit steps (CLIPMILL_CRASH_AT) and at random times, SIGINT/SIGTERM, then the same
    command again                           -> dataset = clean run (ids, statuses, no dup, no temp file)
  a stage raising / a NaN score / a hanging stage -> those videos `failed` with reasons, the rest done
  a second writer on the same OUT            -> refused with the lock message (exit 2); the first is unharmed
  a shard corrupted or deleted afterwards    -> verify_dataset names it and its inputs; repair + rerun = clean
  driver memory                              -> peak RSS flat between N and 4N inputs

Disk full during a commit and an OUT of another schema major version are covered in test_run.py
(`test_disk_full_is_a_clear_error_and_rerun_after_space_frees_completes`, `test_cli_refuses_what_cannot_run`).

The recipe is the default one cut down to the stages that decide what is committed (probe, split,
transcode, frames, quality, filter) with short clips and ONE video per shard, so a run of 8 inputs makes 8
commits: the faults here are in the runner and the commit path, not in the scores, and the whole file must
stay within a few minutes on 2 cores. The random kill times come from a seed printed in every failure
message (set CLIPMILL_FAULT_SEED to replay one).

Media bytes: libx264 as called by stages/transcode.py does not always give the same bytes for the same
frames (measured: see `test_media_bytes_equal_clean_run`), so byte equality of clip media is a separate,
non-strict xfail test; everything else is a hard assertion.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from clipmill import badfiles, synth
from clipmill.pipeline.recipe import load_recipe
from clipmill.storage.shards import CRASH_ENV, read_commits, read_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "clipmill"]
LIGHT_STAGES = ("probe", "split", "transcode", "frames", "quality", "filter")
SEED = int(os.environ.get("CLIPMILL_FAULT_SEED", time.time_ns() % 2**31))
RUN_TIMEOUT_S = 300
SIGKILLED = -signal.SIGKILL  # Popen.returncode of a process killed by SIGKILL


# ----------------------------------------------------------------------------------------------- helpers


@dataclass
class Snapshot:
    """What a dataset holds, as the comparisons here need it."""

    uris: list[str]  # one per ledger row (duplicates kept, so a double ledger shows)
    status: dict[str, tuple[str, str | None]]  # uri -> (status, reason)
    clip_ids: list[str]  # one per clip row
    media: dict[str, str | None]  # clip_id -> media_sha256
    frames: dict[str, int]  # clip_id -> n_frames
    clip_uri: dict[str, str]  # clip_id -> uri of its video
    temps: list[str] = field(default_factory=list)  # hidden temporaries left anywhere under OUT
    out: Path | None = None


def snapshot(out: Path) -> Snapshot:
    """Read dataset OUT through the same readers every tool uses."""
    videos = read_table(out, "videos", ["uri", "status", "reason"]).to_pylist()
    clips = read_table(out, "clips", ["clip_id", "uri", "media_sha256", "n_frames"]).to_pylist()
    return Snapshot(
        uris=[v["uri"] for v in videos],
        status={v["uri"]: (v["status"], v["reason"]) for v in videos},
        clip_ids=[c["clip_id"] for c in clips],
        media={c["clip_id"]: c["media_sha256"] for c in clips},
        frames={c["clip_id"]: c["n_frames"] for c in clips},
        clip_uri={c["clip_id"]: c["uri"] for c in clips},
        temps=sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp")),
        out=out,
    )


def _where_ledgered(got: Snapshot) -> str:
    """For each uri ledgered more than once: the commit records naming it, with their times and files."""
    if got.out is None:
        return ""
    twice = {u for u in got.uris if got.uris.count(u) > 1}
    lines = []
    for rec in read_commits(got.out):
        for u in sorted(twice & set(rec.uris)):
            files = {k: (f.path, f.rows) for k, f in rec.files.items()}
            lines.append(f"{Path(u).name} in {rec.shard} (created {rec.created_at}, files {files})")
    return "records: " + ("; ".join(lines) or "no record names it twice (a videos file holds it twice)")


def assert_equals_clean(got: Snapshot, clean: Snapshot, what: str) -> None:
    """Every input ledgered once with the clean run's status, the clean run's clip_ids, no dup, no temp."""
    assert len(got.uris) == len(set(got.uris)), (
        f"{what}: an input is ledgered twice (seed {SEED}); {_where_ledgered(got)}")
    assert sorted(got.uris) == sorted(clean.uris), f"{what}: inputs ledgered differ from the clean run"
    diff = {u: (got.status.get(u), clean.status.get(u)) for u in set(got.status) | set(clean.status)
            if (got.status.get(u) or (None,))[0] != (clean.status.get(u) or (None,))[0]}
    assert not diff, f"{what}: statuses differ (got, clean): {diff}"
    assert len(got.clip_ids) == len(set(got.clip_ids)), f"{what}: duplicate clip_id (seed {SEED})"
    assert sorted(got.clip_ids) == sorted(clean.clip_ids), f"{what}: clip_ids differ from the clean run"
    assert got.frames == clean.frames, f"{what}: a clip has another frame count than in the clean run"
    assert not got.temps, f"{what}: temporary files left: {got.temps}"


def media_mismatches(got: Snapshot, clean: Snapshot) -> list[str]:
    """clip_ids whose stored media bytes differ from the clean run's."""
    return sorted(c for c, h in got.media.items() if clean.media.get(c) != h)


def cli_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """A copy of `base` without any fault-injection variable, plus `extra`."""
    env = {k: v for k, v in base.items() if k not in (CRASH_ENV, "CLIPMILL_FAULT_INJECT", "RAY_ADDRESS")}
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI to completion (stdout/stderr captured as text)."""
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the CLI; its stderr is captured, stdout dropped."""
    return subprocess.Popen(CLI + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def n_commits(out: Path) -> int:
    """Number of commit records in OUT (0 before the first commit)."""
    return len(list((out / "_commits").glob("part-*.json"))) if (out / "_commits").is_dir() else 0


def wait_for(cond, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S, step: float = 0.05) -> bool:
    """Poll `cond()` until it holds (True) or `proc` exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def peak_rss_mb(proc: subprocess.Popen, step: float = 0.05) -> float:
    """Wait for `proc`, sampling its peak resident set (VmHWM in /proc) until it exits; MiB."""
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(step)
    return peak / 1024


def process_tree(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `root` (read from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                                    .decode(errors="replace").strip())
                except OSError:
                    continue
                frontier.append(child)
    return found


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fcorpus(tmp_path_factory) -> Path:
    """8 inputs: 3 generated shot videos, 2 real samples, an empty file, a truncated MP4 and a text file."""
    d = tmp_path_factory.mktemp("fault_corpus")
    for case in ("cuts", "dissolve", "flash"):
        synth.make_case(case, d / f"{case}.mp4", width=320, height=180)
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copyfile(REPO / "samples" / name, d / name)
    scratch = tmp_path_factory.mktemp("fault_bad")  # make_truncated leaves its (valid) source beside it
    for made in (badfiles.make_empty(scratch), badfiles.make_truncated(scratch), badfiles.make_text(scratch)):
        shutil.copyfile(made, d / made.name)
    assert len(list(d.iterdir())) == 8
    return d


def _light_recipe() -> dict:
    data = load_recipe("default").to_json()
    data.pop("source")
    data["stages"] = [st for st in data["stages"] if next(iter(st)) in LIGHT_STAGES]
    for st in data["stages"]:
        if "split" in st:
            st["split"].update(min_s=1.0, max_s=3.0)
        if "transcode" in st:
            st["transcode"].update(max_side=256)
        if "filter" in st:  # thresholds of the stages left out go; sharpness is calibrated for max_side 512
            st["filter"] = {k: v for k, v in st["filter"].items()
                            if not k.startswith(("min_motion", "max_motion", "max_text", "max_nsfw"))}
            st["filter"]["min_sharpness"] = None
    data["write"]["shard_videos"] = 1
    return data


@pytest.fixture(scope="module")
def frecipe(tmp_path_factory) -> Path:
    """The light test recipe (see the module docstring), written as YAML."""
    p = tmp_path_factory.mktemp("fault_recipe") / "faults.yaml"
    p.write_text(yaml.safe_dump(_light_recipe()))
    return p


@pytest.fixture(scope="module")
def fenv(ray_session) -> dict[str, str]:
    """CLI environment, taken AFTER the session Ray started: ray.init() enables token auth for the cluster
    it starts by setting RAY_AUTH_MODE in this process, and a client joining with --address needs it too."""
    return cli_env(dict(os.environ))


@pytest.fixture(scope="module")
def clean(ray_session, fcorpus, frecipe, fenv, tmp_path_factory) -> Snapshot:
    """One uninterrupted run of the same command every test repeats (the reference)."""
    out = tmp_path_factory.mktemp("fault_clean") / "ds"
    res = run_cli(["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe), "--address", ray_session], fenv)
    assert res.returncode == 0, res.stderr[-3000:]
    snap = snapshot(out)
    assert len(snap.uris) == 8 and len(read_commits(out)) == 8
    assert sum(s == "done" for s, _ in snap.status.values()) == 5 and len(snap.clip_ids) >= 10
    return snap


# --------------------------------------------------------------------- 1. a Ray worker SIGKILLed mid-stage


def test_worker_sigkilled_mid_stage_is_retried_and_run_equals_clean(fcorpus, frecipe, clean, fenv, tmp_path):
    """The run starts its own local Ray; one worker executing a stage task is SIGKILLed; Ray retries it."""
    out = tmp_path / "ds"
    env = {k: v for k, v in fenv.items() if k != "RAY_AUTH_MODE"}  # a fresh local cluster sets its own
    proc = start_cli(["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe)], env)
    victim: tuple[int, str] | None = None
    try:
        wait_for(lambda: n_commits(out) >= 1, proc)
        deadline = time.monotonic() + 120
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            busy = {p: c for p, c in process_tree(proc.pid).items() if c.startswith("ray::MapBatches")}
            if busy:
                victim = min(busy.items())
                os.kill(victim[0], signal.SIGKILL)
            else:
                time.sleep(0.05)
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert victim is not None, ("found no Ray worker executing a stage task under the run's process tree "
                                "(did ray.init() join another cluster instead of starting its own?)")
    assert proc.returncode == 0, err[-3000:]
    got = snapshot(out)
    assert_equals_clean(got, clean, f"worker {victim[0]} ({victim[1][:60]}) SIGKILLed")
    assert not any((r or "").startswith("worker_lost") for _, r in got.status.values())


# ------------------------------------------------------- 2./3. the driver killed at many points, then rerun


@dataclass
class Kill:
    """One injected driver fault and what the process did."""

    chain: str
    fault: str  # CLIPMILL_CRASH_AT spec, "SIGKILL@<s>", "SIGTERM" or "SIGINT"
    returncode: int | None = None
    stderr: str = ""
    commits_before: int = 0
    commits_after: int = 0
    temps_after: list[str] = field(default_factory=list)
    readable_after: bool = False


@dataclass
class KillMatrix:
    """Both chains: every fault injected, and the final datasets."""

    kills: list[Kill]
    finals: dict[str, Path]
    reruns: dict[str, int]


def _after_kill(out: Path, kill: Kill) -> None:
    """What a reader sees right after the kill: committed shards read; nothing half-visible."""
    kill.commits_after = n_commits(out)
    kill.temps_after = sorted(p.name for p in out.rglob(".*.tmp"))
    videos = read_table(out, "videos", ["uri"])
    clips = read_table(out, "clips", ["clip_id"])
    rows = sum(r.files["clips"].rows for r in read_commits(out))
    kill.readable_after = len(videos) == sum(len(r.uris) for r in read_commits(out)) and len(clips) == rows


def _crash_run(args: list[str], env: dict[str, str], out: Path, spec: str, chain: str) -> Kill:
    kill = Kill(chain, spec, commits_before=n_commits(out))
    res = subprocess.run(CLI + args, env=cli_env(env, **{CRASH_ENV: spec}), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    kill.returncode, kill.stderr = res.returncode, res.stderr[-2000:]
    _after_kill(out, kill)
    return kill


def _signal_run(args: list[str], env: dict[str, str], out: Path, sig: signal.Signals, chain: str,
                rng: random.Random) -> Kill:
    """Start a run; after its first commit plus a random delay (SIGKILL: or at a random time) send `sig`."""
    before = n_commits(out)
    proc = start_cli(args, env)
    if sig == signal.SIGKILL:
        at = rng.uniform(0.5, 8.0)
        t0 = time.monotonic()
        wait_for(lambda: n_commits(out) > before or time.monotonic() - t0 > at, proc)
        delay = rng.uniform(0.0, 0.1)
        fault = f"SIGKILL@{time.monotonic() - t0 + delay:.2f}s"
    else:
        wait_for(lambda: n_commits(out) > before, proc)
        delay = rng.uniform(0.0, 0.5)
        fault = sig.name
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    kill = Kill(chain, fault, proc.returncode, err[-2000:], before)
    _after_kill(out, kill)
    return kill


# Chain A walks the commit steps on one OUT; each step commits as many shards as its N allows (8 in all).
CHAIN_A = ("before_record:0", "after_record:0", "mid_rename:0", "before_record:1", "after_record:1",
           "mid_rename:1", "before_record:0")
CHAIN_B = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL)


@pytest.fixture(scope="module")
def kill_matrix(ray_session, fcorpus, frecipe, fenv, clean, tmp_path_factory) -> KillMatrix:
    """Chain A: crash points inside shard commits; chain B: SIGTERM, SIGINT and SIGKILL at random times.
    Each fault is followed by the same command; at the end a plain rerun (repeated until exit 0, at most 3)."""
    rng = random.Random(SEED)
    kills: list[Kill] = []
    finals: dict[str, Path] = {}
    reruns: dict[str, int] = {}
    for chain in ("A", "B"):
        out = tmp_path_factory.mktemp(f"fault_chain{chain}") / "ds"
        args = ["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe), "--address", ray_session]
        if chain == "A":
            for spec in CHAIN_A:
                kills.append(_crash_run(args, fenv, out, spec, chain))
        else:
            n_inputs = len(list(fcorpus.iterdir()))
            for i, sig in enumerate(CHAIN_B):
                left = n_inputs - (len(read_table(out, "videos", ["uri"])) if out.exists() else 0)
                # SIGINT/SIGTERM get a fresh OUT: the inputs left over may be only fast rejects, and a signal
                # 0-0.5 s after a commit would then find a run that had already finished its work
                fresh = sig != signal.SIGKILL and left < n_inputs
                if fresh or left < 3 or (kills and kills[-1].chain == "B" and kills[-1].returncode == 0):
                    # too little is left to interrupt on this OUT (a signal sent after its last commit would
                    # find a finished run): finish it as its own chain and go on with a fresh one
                    res = run_cli(args, fenv)
                    assert res.returncode == 0, f"chain B{i}: rerun failed: {res.stderr[-3000:]}"
                    finals[f"B{i}"], reruns[f"B{i}"] = out, 0
                    out = tmp_path_factory.mktemp(f"fault_chainB{i}") / "ds"
                    args = ["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe), "--address", ray_session]
                kills.append(_signal_run(args, fenv, out, sig, chain, rng))
        n, res = 0, None
        while n < 3 and (res is None or res.returncode != 0):
            n += 1
            res = run_cli(args, fenv)
        assert res.returncode == 0, f"chain {chain}: rerun {n} failed: {res.stderr[-3000:]}"
        finals[chain], reruns[chain] = out, n
    return KillMatrix(kills, finals, reruns)


def test_driver_killed_at_commit_steps_and_random_times_then_rerun_equals_clean(kill_matrix, clean):
    """10+ SIGKILLs of the driver (inside commits and at random times); the final dataset is the clean one."""
    table = "\n".join(f"{k.chain} {k.fault:>18} rc={k.returncode} commits {k.commits_before}->{k.commits_after} "
                      f"temps={len(k.temps_after)}" for k in kill_matrix.kills)
    hard = [k for k in kill_matrix.kills if k.returncode == SIGKILLED]
    assert len(hard) >= 10, f"only {len(hard)} kills landed (seed {SEED}):\n{table}"
    for step in ("before_record", "after_record", "mid_rename"):
        assert sum(k.fault.startswith(step) for k in hard) >= 2, f"{step}: crash point not reached\n{table}"
    for k in kill_matrix.kills:
        assert k.readable_after, f"{k.fault}: committed shards did not read back right after the kill\n{table}"
        if k.fault.startswith("before_record"):  # the shard being committed is invisible: no record
            assert k.commits_after == k.commits_before + int(k.fault.split(":")[1]), table
        elif k.fault.startswith(("after_record", "mid_rename")):  # the commit point was passed: it counts
            assert k.commits_after == k.commits_before + int(k.fault.split(":")[1]) + 1, table
    # a crash after the commit point leaves the committed files under their temporary names (rolled forward)
    assert any(k.temps_after for k in hard if k.fault.startswith("mid_rename")), table
    for chain, out in kill_matrix.finals.items():
        assert_equals_clean(snapshot(out), clean, f"chain {chain} (seed {SEED})\n{table}")


def test_sigint_and_sigterm_exit_128_plus_n_say_how_to_resume(kill_matrix):
    """SIGTERM -> 143, SIGINT -> 130; finished videos are committed; the message says to run it again."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        [k] = [k for k in kill_matrix.kills if k.fault == sig.name]
        assert k.returncode == 128 + sig, k.stderr
        assert f"interrupted by {sig.name}" in k.stderr and "Run the same command again" in k.stderr, k.stderr
        assert k.commits_after > k.commits_before  # the video finished before the signal was committed
        assert not k.temps_after and k.readable_after
    # the chain that took them ends equal to the clean run (checked with the kills above)
    assert "B" in kill_matrix.finals


@pytest.mark.xfail(strict=False, reason=(
    "libx264 via PyAV gives different bytes for the same frames on some runs. Measured on 2 cores: two CLEAN "
    "runs differed in 1-2 of 16-17 clips in some invocations, 0 in others (bench/faults.py reports it as "
    "clean_vs_clean_mismatched); in one process, encoding the same 60 ndarray frames 30 times gave 8-9 distinct "
    "bitstreams when interleaved with decoding and 1 when not, with threads=0 and threads=1 alike: it depends "
    "on heap state (an uninitialized read?), not on the thread count. Not caused by kills or resume."))
def test_media_bytes_equal_clean_run(kill_matrix, clean):
    """Every kept clip of a killed-and-resumed run has the clean run's media bytes (media_sha256)."""
    for chain, out in kill_matrix.finals.items():
        assert media_mismatches(snapshot(out), clean) == [], f"chain {chain}"


# ------------------------------------------------------------------------ 4. stages raising, NaN, hanging


def test_raising_nan_and_hanging_stages_fail_only_their_videos(ray_session, fcorpus, frecipe, fenv, clean,
                                                               tmp_path):
    """probe raises on one input, transcode on another, quality returns NaN on a third, split hangs on a
    fourth (killed by runtime.video_timeout_s): those are `failed` with the reason; the rest as in the clean run."""
    data = yaml.safe_load(frecipe.read_text())
    data["runtime"]["video_timeout_s"] = 4
    rp = tmp_path / "timeout.yaml"
    rp.write_text(yaml.safe_dump(data))
    faults = "probe:carphone;transcode:cuts.mp4;quality:nan:bikes.mp4;split:hang:dissolve.mp4"
    out = tmp_path / "ds"
    res = run_cli(["run", str(fcorpus), "-o", str(out), "--recipe", str(rp), "--address", ray_session],
                  cli_env(fenv, CLIPMILL_FAULT_INJECT=faults))
    assert res.returncode == 0, res.stderr[-3000:]
    got = snapshot(out)
    by_name = {Path(u).name: s for u, s in got.status.items()}
    expect = {"carphone_pristine.mp4": "probe: InjectedFault", "cuts.mp4": "transcode: InjectedFault",
              "bikes.mp4": "is nan", "dissolve.mp4": "split: StageTimeout: exceeded 4 s"}
    for name, reason in expect.items():
        status, why = by_name[name]
        assert status == "failed" and reason in (why or ""), (name, status, why)
    assert "videos: 1 done, 3 rejected, 4 failed" in res.stdout, res.stdout
    assert sorted(got.uris) == sorted(clean.uris) and len(got.uris) == len(set(got.uris))
    for uri, (status, _) in got.status.items():
        if Path(uri).name not in expect:
            assert status == clean.status[uri][0], uri
    failed = {u for u, (s, _) in got.status.items() if s == "failed"}
    assert sorted(got.clip_ids) == sorted(c for c in clean.clip_ids if clean.clip_uri[c] not in failed)
    assert got.clip_ids and not got.temps


# ------------------------------------------------------------------- 6. a second writer on the same OUT


def test_second_run_on_same_out_is_refused_and_first_completes(ray_session, fcorpus, frecipe, fenv, clean,
                                                               tmp_path):
    out = tmp_path / "ds"
    args = ["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe), "--address", ray_session]
    first = start_cli(args, fenv)
    try:
        assert wait_for(lambda: n_commits(out) >= 1, first), "the first run never committed"
        second = run_cli(args, fenv)
        still_running = first.poll() is None
        _, err = first.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert still_running, "the first run ended before the second started: nothing was tested"
    assert second.returncode == 2, second.stderr
    assert f"is being written by another clipmill run (pid {first.pid})" in second.stderr, second.stderr
    assert "wait for it to finish or write to another directory" in second.stderr
    assert first.returncode == 0, err[-3000:]
    assert_equals_clean(snapshot(out), clean, "after a refused second writer")


# ------------------------------------------------------------ 7. a shard corrupted / deleted afterwards


def test_corrupted_and_deleted_shards_are_found_repaired_and_rerun(ray_session, fcorpus, frecipe, fenv, clean,
                                                                   tmp_path):
    from clipmill.storage.verify import repair_dataset, verify_dataset

    out = tmp_path / "ds"
    shutil.copytree(clean.out, out)  # a copy of the clean run's dataset, damaged below
    args = ["run", str(fcorpus), "-o", str(out), "--recipe", str(frecipe), "--address", ray_session]
    with_clips = [r for r in read_commits(out) if r.files["clips"].rows > 0]
    flipped, deleted = with_clips[0], with_clips[1]
    path = out / flipped.files["clips"].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed inside a data page
    path.write_bytes(bytes(data))
    (out / deleted.files["videos"].path).unlink()

    report = verify_dataset(out)
    assert not report.ok
    assert sorted(report.broken_shards) == sorted([flipped.shard, deleted.shard])
    kinds = {(p.shard, p.kind) for p in report.problems}
    assert (flipped.shard, "checksum") in kinds and (deleted.shard, "missing") in kinds, report.problems
    assert sorted(report.rerun_uris) == sorted(flipped.uris + deleted.uris)
    text = report.format()
    assert all(Path(u).name in text for u in flipped.uris + deleted.uris) or len(report.rerun_uris) > 20, text

    repaired = repair_dataset(out, report)
    assert sorted(repaired.quarantined_shards) == sorted([flipped.shard, deleted.shard])
    assert verify_dataset(out).ok
    res = run_cli(args, fenv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"inputs: {len(report.rerun_uris)} processed" in res.stdout, res.stdout
    assert_equals_clean(snapshot(out), clean, "after verify + repair + rerun")
    assert verify_dataset(out).clean


# --------------------------------------------------------------------------- 9. driver memory stays flat


def test_driver_peak_rss_is_flat_between_n_and_4n_inputs(ray_session, frecipe, fenv, tmp_path, record_property):
    """Peak RSS (VmHWM) of the driver over 2 and over 8 distinct generated videos; ratio < 1.5.
    Not a timing assertion: the driver must not hold finished videos' clips and media after their commit."""
    src = tmp_path / "in"
    src.mkdir()
    cases = ("cuts", "flash", "dissolve", "cuts", "flash", "dissolve", "cuts", "flash")
    paths = [synth.make_case(c, src / f"{c}_{i}.mp4", seed=100 + i, width=320, height=180)["path"]
             for i, c in enumerate(cases)]
    peaks = {}
    for n in (2, 8):
        out = tmp_path / f"ds{n}"
        proc = start_cli(["run", *map(str, paths[:n]), "-o", str(out), "--recipe", str(frecipe),
                          "--address", ray_session], fenv)
        peaks[n] = peak_rss_mb(proc)
        err = proc.stderr.read()
        assert proc.wait() == 0, err[-3000:]
        assert len(read_table(out, "videos", ["uri"])) == n
    record_property("driver_peak_rss_mib", peaks)
    assert peaks[2] > 50, peaks  # sampling worked
    assert peaks[8] / peaks[2] < 1.5, f"driver peak RSS MiB by inputs: {peaks}"
