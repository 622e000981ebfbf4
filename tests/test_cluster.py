"""A real multi-node Ray cluster on this machine: a head and a worker node started with `ray start` (each with its
own temp dir, 1 CPU, a 200 MB object store); `clipmill run --address` joins it and gives the same dataset as a
local run, with stage tasks on both nodes. Only the processes these tests started are stopped (by their process
groups and temp dir), never a global `ray stop`: other Ray instances may share the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clipmill import synth
from clipmill.pipeline.inputs import expand_inputs
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.runner import run
from clipmill.storage.shards import read_run_json, read_table

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OBJECT_STORE = 200 * 10**6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> int:
    """Run `ray start ...` in a new session; returns its pid (= the process group of the daemons it leaves)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats"], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        rc = proc.wait(timeout=120)
    if rc != 0:
        raise RuntimeError(f"ray start failed ({rc}): {log.read_text()[-2000:]}")
    return proc.pid


def _kill_ours(pgids: list[int], marker: str) -> None:
    """SIGKILL the process groups we started and any process whose command line names our temp dir."""
    for pg in pgids:
        try:
            os.killpg(pg, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(3):
        left = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd:
                left.append(int(d.name))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not left:
            return
        time.sleep(0.5)


@pytest.fixture
def cluster(clipmill_env):
    """Head + one worker node; yields (address, env for drivers)."""
    tmp = tempfile.mkdtemp(prefix="cm-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(clipmill_env, RAY_AUTH_MODE="token")  # clusters started by `ray start` use token auth (Ray 2.59+)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    pgids: list[int] = []
    try:
        pgids.append(_ray_start(
            ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={tmp}/head", "--include-dashboard=false",
             f"--dashboard-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}"], env, Path(tmp) / "head.log"))
        pgids.append(_ray_start(
            [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={tmp}/worker",
             f"--dashboard-agent-listen-port={_free_port()}"], env, Path(tmp) / "worker.log"))
        yield address, env
    finally:
        _kill_ours(pgids, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive_nodes(address: str, env: dict[str, str], want: int) -> list[str]:
    code = (
        "import json, time, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
        "for _ in range(60):\n"
        "    ids = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
        f"    if len(ids) >= {want}:\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(ids))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster-in")
    for case in ("cuts", "flash", "dissolve"):
        synth.make_case(case, d / f"{case}.mp4", width=160, height=96)
    return d


@pytest.fixture(scope="module")
def recipe_path(small_recipe_path) -> Path:
    return small_recipe_path


def _summary(out: Path) -> tuple[list, list]:
    v = sorted((Path(r["uri"]).name, r["video_id"], r["status"], r["reason"], r["n_frames"], r["cuts"],
                r["n_clips"], r["n_kept"]) for r in read_table(out, "videos").to_pylist())
    c = sorted((r["clip_id"], r["n_frames"], r["kept"], tuple(r["reject_reasons"]), r["media"] is not None)
               for r in read_table(out, "clips").to_pylist())
    return v, c


def test_run_on_a_two_node_cluster_equals_a_local_run(ray_session, cluster, inputs, recipe_path, tmp_path):
    address, env = cluster
    nodes = _alive_nodes(address, env, 2)
    assert len(nodes) == 2

    out = tmp_path / "cluster-ds"
    driver_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # clipmill finds the token by itself
    res = subprocess.run([str(BIN / "clipmill"), "run", str(inputs), "-o", str(out), "--recipe", str(recipe_path),
                          "--address", address, "--no-progress"], env=driver_env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 done" in res.stdout

    ref = tmp_path / "local-ds"
    run(expand_inputs([str(inputs)]), ref, load_recipe(recipe_path))
    assert _summary(out) == _summary(ref)

    metrics = read_run_json(out)["runs"][-1]["metrics"]
    used = set(metrics["nodes"])
    assert used == {n[:12] for n in nodes}, (used, nodes)  # stage tasks ran on the head and on the worker
    assert metrics["stages"]["probe"]["rows_in"] == 3
    assert sum(metrics["stages"]["split"]["nodes"].values()) == 3

