"""Whole-pipeline benchmark: the default recipe over 10 and 50 generated videos.

Measures in the same run:
  * pure PyAV sequential decode of the same inputs (the reference: no pipeline can read faster),
  * `clipmill run` wall time (a fresh process with its own embedded Ray), as throughput in video-seconds per
    wall-second and per core, and as a ratio to the pure decode,
  * seconds spent per stage (from run.json, summed over workers),
  * peak RSS of the driver alone and of the whole process tree (driver + Ray's processes), sampled every 0.1 s,
    for 10 vs 50 inputs: memory must stay flat in the input count.
Prints a table, writes bench/results/pipeline.json, and prints one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av

from clipmill import synth

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _tree_rss(root: int) -> tuple[int, int]:
    """(driver RSS, total RSS of the driver and all its descendants), in bytes."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss(pid)
        stack += _children(pid)
    return _rss(root), total


# 20.2 s at 25 fps: five shots of 2.4-5.6 s joined by cuts, a dissolve and a fade, with a flash and a static shot.
SHOTS = [
    synth.Shot(120, "pan"),
    synth.Shot(100, "zoom", flashes=((40, 2),)),
    synth.Shot(140, "fast", enter="dissolve", enter_frames=20),
    synth.Shot(60, "static"),
    synth.Shot(55, "pan", enter="fade", enter_frames=15),
]


def make_inputs(d: Path, n: int) -> list[Path]:
    """n distinct generated 480x270 videos (SHOTS; a different seed each, so no duplicate content)."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = d / f"v{i:03d}.mp4"
        if not p.exists():
            synth.make_shots_video(p, SHOTS, width=480, height=270, seed=100 + i)
        paths.append(p)
    return paths


def pure_decode_s(paths: list[Path]) -> tuple[float, int, float]:
    """Seconds to decode every frame of `paths` sequentially (threaded), frames, and video seconds."""
    t0 = time.perf_counter()
    frames, seconds = 0, 0.0
    for p in paths:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for _ in c.decode(s):
                frames += 1
            seconds += float(s.frames / s.average_rate) if s.frames and s.average_rate else 0.0
    return time.perf_counter() - t0, frames, seconds


def run_pipeline(inputs: Path, out: Path) -> dict:
    """Run `clipmill run` on a fresh local Ray; returns wall time, peak RSS and run.json figures."""
    cmd = [sys.executable, "-m", "clipmill", "run", str(inputs), "-o", str(out), "--no-progress"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    peak = {"driver": 0, "tree": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            drv, tree = _tree_rss(proc.pid)
            peak["driver"], peak["tree"] = max(peak["driver"], drv), max(peak["tree"], tree)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"clipmill run failed ({proc.returncode}):\n{stderr[-3000:]}")
    meta = json.loads((out / "run.json").read_text())
    prog = meta["runs"][-1]["progress"]
    return {"wall_s": wall, "peak_rss_driver_mb": peak["driver"] / 2**20, "peak_rss_tree_mb": peak["tree"] / 2**20,
            "videos": prog["videos"], "clips": prog["clips"], "kept": prog["kept"],
            "video_seconds": prog["video_seconds"], "stage_seconds": prog["stage_seconds"]}


def main() -> None:
    cores = os.cpu_count() or 1
    figures: dict = {"cores": cores}
    with tempfile.TemporaryDirectory(prefix="clipmill-bench-") as tmp:
        tmp = Path(tmp)
        all_inputs = make_inputs(tmp / "all", 50)
        for n in (10, 50):
            d = tmp / f"in{n}"
            d.mkdir()
            for p in all_inputs[:n]:
                os.link(p, d / p.name)
            dec_s, dec_frames, vid_s = pure_decode_s(all_inputs[:n])
            res = run_pipeline(d, tmp / f"out{n}")
            res.update(decode_s=dec_s, decode_frames=dec_frames, decode_fps=dec_frames / dec_s,
                       pipeline_over_decode=res["wall_s"] / dec_s,
                       video_s_per_wall_s=res["video_seconds"] / res["wall_s"],
                       video_h_per_h_per_core=res["video_seconds"] / res["wall_s"] / cores)
            figures[f"n{n}"] = res
            print(f"{n:3d} inputs: {res['video_seconds']:.0f} s of video in {res['wall_s']:.1f} s wall "
                  f"({res['video_s_per_wall_s']:.2f}x realtime, {res['video_h_per_h_per_core']:.2f} video-h/h/core); "
                  f"pure decode {dec_s:.2f} s -> pipeline/decode {res['pipeline_over_decode']:.1f}x; "
                  f"clips {res['clips']} kept {res['kept']}; peak RSS driver {res['peak_rss_driver_mb']:.0f} MB, "
                  f"tree {res['peak_rss_tree_mb']:.0f} MB")
            for stage, sec in sorted(res["stage_seconds"].items(), key=lambda kv: -kv[1]):
                print(f"      {stage:10s} {sec:8.2f} s  ({sec / max(res['video_seconds'], 1e-9) * 1000:.1f} ms per video-second)")
    figures["rss_driver_ratio_50_vs_10"] = figures["n50"]["peak_rss_driver_mb"] / figures["n10"]["peak_rss_driver_mb"]
    figures["rss_tree_ratio_50_vs_10"] = figures["n50"]["peak_rss_tree_mb"] / figures["n10"]["peak_rss_tree_mb"]
    print(f"peak RSS 50 vs 10 inputs: driver x{figures['rss_driver_ratio_50_vs_10']:.2f}, "
          f"tree x{figures['rss_tree_ratio_50_vs_10']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
