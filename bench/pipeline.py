"""Whole-pipeline benchmark: the default recipe over 10 and 50 generated videos.

Measures in the same run:
  * pure PyAV sequential decode of the same inputs (the reference: no pipeline can read faster),
  * `clipmill run` wall time (a fresh process with its own embedded Ray), as throughput in video-seconds per
    wall-second and per core, and as a ratio to the pure decode,
  * seconds spent per stage (from run.json, summed over workers),
  * peak RSS of the driver alone and of the whole process tree (driver + Ray's processes), sampled every 0.1 s,
    for 10 vs 50 inputs: memory must stay flat in the input count,
  * the HTML report (`clipmill report`) of a 1k-clip and a 100k-clip dataset: generation seconds (reference in
    the same run: `clipmill stats` over the same dataset, i.e. one DuckDB pass of plain aggregates), page size,
    and page load time in headless Chromium (navigation to the load event, and to the first paint with every
    gallery thumbnail decoded), median of 3 loads. 100k real clips cannot be made here, so these datasets are
    SYNTHETIC: written with the real shard writer and schema, scores drawn from realistic distributions and
    judged by the real filter, thumbnails and MP4 media reused from a few small real H.264 clips (160x96, 2 s).
    `--only report` runs just this part (results in bench/results/pipeline_report.json).
Prints a table, writes bench/results/pipeline.json, and prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa

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
    stages = (meta["runs"][-1].get("metrics") or {}).get("stages") or {}
    return {"wall_s": wall, "peak_rss_driver_mb": peak["driver"] / 2**20, "peak_rss_tree_mb": peak["tree"] / 2**20,
            "videos": prog["videos"], "clips": prog["clips"], "kept": prog["kept"],
            "video_seconds": prog["video_seconds"], "stage_seconds": prog["stage_seconds"],
            "stage_video_s_per_busy_s": {k: v.get("video_s_per_busy_s") for k, v in stages.items()}}


# ----------------------------------------------------------------------------------------------- the report


MEDIA_PAD, THUMB_PAD = 30_000, 8_000  # bytes: stored clips of ~40-60 KB, thumbnails of ~12 KB


def make_media_pool(d: Path, n: int = 6) -> list[tuple[bytes, bytes]]:
    """n small real H.264 MP4 clips (160x96, 2 s, 25 fps) and a JPEG thumbnail of each one's middle frame."""
    d.mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(n):
        p = d / f"pool{i}.mp4"
        synth.make_shots_video(p, [synth.Shot(50, ("pan", "zoom", "fast")[i % 3])], width=160, height=96, seed=7 + i)
        with av.open(str(p)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frames[len(frames) // 2], cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise SystemExit("cv2.imencode failed")
        pool.append((p.read_bytes(), jpg.tobytes()))
    return pool


def _scores(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Score columns with the shapes seen on real runs (heavy tails, spikes at 0, a few outliers)."""
    text = np.where(rng.random(n) < 0.8, 0.0, rng.exponential(0.04, n))
    black = np.where(rng.random(n) < 0.97, 0.0, rng.choice([0.25, 0.5, 0.75, 1.0], n))
    return {
        "brightness": np.clip(rng.normal(112, 38, n), 0, 255), "contrast": rng.lognormal(3.7, 0.45, n),
        "sharpness": rng.lognormal(5.9, 0.9, n), "frame_diff": rng.gamma(1.6, 4.0, n), "black_fraction": black,
        "brisque": np.clip(rng.normal(36, 11, n), 0, 100), "blockiness": 1 + rng.gamma(1.2, 0.08, n),
        "exposure": rng.beta(0.4, 12, n), "motion_score": rng.gamma(1.3, 0.05, n), "text_area": np.minimum(text, 1),
        "nsfw_score": rng.beta(0.4, 30, n),
    }


def make_synthetic_dataset(out: Path, n_clips: int, pool: list[tuple[bytes, bytes]], recipe: dict,
                           clips_per_shard: int = 5000, seed: int = 0, media_pad: int = MEDIA_PAD) -> dict:
    """A dataset of `n_clips` synthetic clips (5 per video, 2% of inputs rejected) written with the real
    ShardWriter; the real filter stage decides kept/reject_reasons from the recipe's thresholds. Kept clips
    store their pool MP4 plus `media_pad` random bytes."""
    from clipmill.stages.filter import FilterConfig, reject_reasons  # noqa: PLC0415
    from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA, aspect_bucket  # noqa: PLC0415
    from clipmill.storage.shards import ShardWriter, write_json_atomic  # noqa: PLC0415

    params = next(s["filter"] for s in recipe["stages"] if "filter" in s)
    cfg = FilterConfig(**params)
    rng = np.random.default_rng(seed)
    sizes = [(512, 288), (512, 384), (288, 512), (512, 214), (384, 384)]
    n_kept = clip_no = 0
    with ShardWriter(out) as w:
        v_no = 0
        while clip_no < n_clips:
            m = min(clips_per_shard, n_clips - clip_no)
            sc = _scores(rng, m)
            videos, clips = [], []
            for j in range(m):
                if j % 5 == 0:
                    v_no += 1
                    vid, uri = f"v{v_no:08d}", f"/data/raw/batch{v_no // 1000:03d}/video_{v_no:07d}.mp4"
                    if rng.random() < 0.02:  # a rejected input next to every 50 readable ones
                        videos.append({"video_id": f"x{v_no:08d}", "uri": uri + ".part", "status": "rejected",
                                       "reason": "unreadable: moov atom not found", "size_bytes": 4096})
                    w_, h_ = sizes[int(rng.integers(len(sizes)))]
                    videos.append({"video_id": vid, "uri": uri, "status": "done", "duration_s": 60.0, "fps": 25.0,
                                   "width": w_, "height": h_, "codec": "h264", "n_clips": 5, "n_kept": 0})
                row = {k: float(v[j]) for k, v in sc.items()}
                row.update(static=bool(row["frame_diff"] < 0.3), slideshow=bool(rng.random() < 0.01),
                           start_s=float(rng.uniform(0, 50)), clip_duration_s=float(rng.uniform(2, 10)))
                row["end_s"] = row["start_s"] + row["clip_duration_s"]
                reasons = reject_reasons(row, cfg)
                media, thumb = pool[clip_no % len(pool)]
                # every clip's bytes unique and incompressible, as in a real dataset (else Parquet's dictionary
                # and zstd would store the 6 pool clips once): an MP4 'free' box (MEDIA_PAD random bytes) and a
                # JPEG comment segment (THUMB_PAD random bytes), both skipped by decoders
                thumb = thumb[:2] + b"\xff\xfe" + (THUMB_PAD + 2).to_bytes(2, "big") + rng.bytes(THUMB_PAD) + thumb[2:]
                if not reasons:
                    media = media + (media_pad + 8).to_bytes(4, "big") + b"free" + rng.bytes(media_pad)
                clips.append({
                    "clip_id": f"{vid}-{clip_no:07d}", "video_id": vid, "uri": uri, "clip_index": j % 5,
                    "start_s": row["start_s"], "end_s": row["end_s"], "duration_s": row["clip_duration_s"],
                    "n_frames": int(row["clip_duration_s"] * 25), "fps": 25.0, "width": videos[-1]["width"],
                    "height": videos[-1]["height"], "aspect_bucket": aspect_bucket(videos[-1]["width"],
                                                                                   videos[-1]["height"]),
                    **{k: row[k] for k in sc}, "static": row["static"], "slideshow": row["slideshow"],
                    "camera_motion": ("static", "pan_left", "pan_right", "zoom_in", "complex")[clip_no % 5],
                    "kept": not reasons, "reject_reasons": reasons,
                    "caption": f"A synthetic clip number {clip_no} of a benchmark dataset." if not reasons else None,
                    "thumbnail": thumb, "media": media if not reasons else None,
                    "media_codec": "h264" if not reasons else None,
                })
                n_kept += not reasons
                clip_no += 1
            w.commit(pa.Table.from_pylist(videos, schema=VIDEOS_SCHEMA), pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA))
    write_json_atomic(out / "run.json", {
        "schema_version": "1.1", "recipe": recipe, "note": "synthetic benchmark dataset (bench/pipeline.py)",
        "runs": [{"started_at": "-", "finished_at": "-", "argv": ["bench"], "progress": {
            "videos": v_no, "clips": n_clips, "kept": n_kept, "elapsed_s": 1.0, "video_seconds": 60.0 * v_no,
            "stage_seconds": {"probe": 0.1, "split": 4.1, "transcode": 17.7, "frames": 7.1, "quality": 1.1,
                              "motion": 2.9, "ocr": 11.6, "safety": 5.9, "embedding": 0.1, "filter": 0.0}}}],
    })
    return {"clips": n_clips, "kept": n_kept, "videos": v_no,
            "dataset_mb": sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20}


_GALLERY_PAINTED = """() => new Promise(resolve => {
  const check = () => {
    const imgs = Array.from(document.querySelectorAll('#gallery img.thumb'));
    if (imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)) {
      requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now())));
    } else { setTimeout(check, 5); }
  };
  check();
})"""


def page_load(browser, html: Path, repeats: int = 3, screenshot: Path | None = None) -> dict:
    """Median load figures of `html` in a fresh page each time: ms to the load event, to the first
    contentful paint, and to the first paint with all gallery thumbnails decoded (performance clock).
    Saves a full-page screenshot of the last load to `screenshot` when given."""
    load, fcp, gallery = [], [], []
    warm = browser.new_page()  # one unmeasured load: the first page of a browser pays its start-up
    warm.goto(html.as_uri(), wait_until="load")
    warm.close()
    for i in range(repeats):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.goto(html.as_uri(), wait_until="load")
        gallery.append(page.evaluate(_GALLERY_PAINTED))
        nav = page.evaluate("() => performance.getEntriesByType('navigation')[0].toJSON()")
        paints = page.evaluate("() => performance.getEntriesByType('paint').map(p => [p.name, p.startTime])")
        load.append(nav["loadEventEnd"])
        fcp.append(dict(paints).get("first-contentful-paint", float("nan")))
        if screenshot is not None and i == repeats - 1:
            page.screenshot(path=str(screenshot), full_page=True, type="jpeg", quality=60)
        page.close()
        if errors:
            raise SystemExit(f"page errors in {html}: {errors}")
    return {"load_ms": statistics.median(load), "first_paint_ms": statistics.median(fcp),
            "gallery_painted_ms": statistics.median(gallery)}


def report_bench(tmp: Path) -> dict:
    """Generation and page-load figures of the report on synthetic 1k- and 100k-clip datasets."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    from clipmill.pipeline.recipe import load_recipe  # noqa: PLC0415
    from clipmill.storage.report import write_report  # noqa: PLC0415
    from clipmill.storage.stats import dataset_stats  # noqa: PLC0415

    recipe = load_recipe("default").to_json()
    pool = make_media_pool(tmp / "pool")
    res: dict = {"synthetic": True, "note": "synthetic datasets: real writer/schema/filter, reused small real MP4s"}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            # 1k and 100k clips of ~40-60 KB; then 1k clips of ~0.85 MB, so the page holds its full 40 MB of video
            for name, n, pad in (("clips1000", 1000, MEDIA_PAD), ("clips100000", 100_000, MEDIA_PAD),
                                 ("clips1000_media_cap_full", 1000, 850_000)):
                out = tmp / name
                t0 = time.perf_counter()
                info = make_synthetic_dataset(out, n, pool, recipe, media_pad=pad)
                info["write_s"] = time.perf_counter() - t0
                html = tmp / f"{name}.html"
                stats_s, gen_s = [], []
                for _ in range(2):  # best of 2: the first call of a process also pays imports and DuckDB start-up
                    t0 = time.perf_counter()
                    dataset_stats(out)
                    stats_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    summary = write_report(out, html)
                    gen_s.append(time.perf_counter() - t0)
                info["stats_s"], info["generate_s"] = min(stats_s), min(gen_s)
                info["generate_over_stats"] = info["generate_s"] / info["stats_s"]
                info["page_mb"] = summary.bytes / 2**20
                info["media_embedded"] = summary.media_embedded
                info["media_mb"] = summary.media_bytes / 2**20
                info["phase_seconds"] = summary.phase_seconds
                RESULTS.mkdir(parents=True, exist_ok=True)
                shot = RESULTS / "report_100k_screenshot.jpg" if n == 100_000 else None
                info.update(page_load(browser, html, screenshot=shot))
                res[name] = info
                print(f"report of {n:>6,} clips ({info['kept']:,} kept, {info['dataset_mb']:.0f} MB of shards): "
                      f"generated in {info['generate_s']:.2f} s ({info['generate_over_stats']:.1f}x `stats` "
                      f"{info['stats_s']:.2f} s; best of 2), page {info['page_mb']:.1f} MB ({info['media_embedded']} clips, "
                      f"{info['media_mb']:.1f} MB of video); load event {info['load_ms']:.0f} ms, "
                      f"first paint {info['first_paint_ms']:.0f} ms, gallery painted {info['gallery_painted_ms']:.0f} ms")
                shutil.rmtree(out)
        finally:
            browser.close()
    big, small = res["clips100000"], res["clips1000"]
    res["generate_ratio_100k_vs_1k"] = big["generate_s"] / small["generate_s"]
    res["load_ratio_100k_vs_1k"] = big["gallery_painted_ms"] / small["gallery_painted_ms"]
    res["load_ratio_media_cap_full_vs_1k"] = (res["clips1000_media_cap_full"]["gallery_painted_ms"]
                                              / small["gallery_painted_ms"])
    print(f"100k vs 1k clips: generation x{res['generate_ratio_100k_vs_1k']:.2f}, "
          f"gallery paint x{res['load_ratio_100k_vs_1k']:.2f}; a page holding its full 40 MB of video: "
          f"gallery paint x{res['load_ratio_media_cap_full_vs_1k']:.2f} of the 1k page")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("pipeline", "report"), default=None,
                    help="run one part only (default: both)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    figures: dict = {"cores": cores}
    if args.only == "report":
        with tempfile.TemporaryDirectory(prefix="clipmill-bench-") as tmp:
            figures["report"] = report_bench(Path(tmp))
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pipeline_report.json").write_text(json.dumps(figures, indent=1, sort_keys=True))
        print(json.dumps(figures, sort_keys=True))
        return
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
                rate = res["stage_video_s_per_busy_s"].get(stage)
                print(f"      {stage:10s} {sec:8.2f} s  ({sec / max(res['video_seconds'], 1e-9) * 1000:.1f} ms per "
                      f"video-second" + (f"; {rate:.1f} video-s per busy s)" if rate else ")"))
    figures["rss_driver_ratio_50_vs_10"] = figures["n50"]["peak_rss_driver_mb"] / figures["n10"]["peak_rss_driver_mb"]
    figures["rss_tree_ratio_50_vs_10"] = figures["n50"]["peak_rss_tree_mb"] / figures["n10"]["peak_rss_tree_mb"]
    print(f"peak RSS 50 vs 10 inputs: driver x{figures['rss_driver_ratio_50_vs_10']:.2f}, "
          f"tree x{figures['rss_tree_ratio_50_vs_10']:.2f}")
    if args.only is None:
        with tempfile.TemporaryDirectory(prefix="clipmill-bench-") as tmp:
            figures["report"] = report_bench(Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
