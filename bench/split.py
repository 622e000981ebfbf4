"""Benchmark of shot-boundary detection: speed against pure decoding and the PySceneDetect CLI, and accuracy.

Videos: synthetic cases from clipmill.synth (generated into --workdir, reused when present) including one
long 720p H.264 "everything" video, plus the shared real samples (../shared/testdata) when present.

Measured in one run, on the same files:
  * pure PyAV sequential decode (threaded, no conversion): the speed limit,
  * our default detector (detect_shots), end to end,
  * `scenedetect -i FILE -q detect-adaptive` as a subprocess (the executable next to sys.executable),
  * cut precision/recall/F1 (+-1 frame), cuts at flashes, transition recall/precision for the default,
    content, adaptive and transnetv2 detectors (transnetv2 on the short videos only: it runs ~50 fps on CPU).

Prints a table, then as the LAST line one JSON object with every figure. Results also go to
bench/results/split.json. Run: .venv/bin/python bench/split.py [--workdir DIR] [--long-seconds 90]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
RESULTS = ROOT / "bench" / "results" / "split.json"

from clipmill.stages.shots import detect_shots  # noqa: E402
from clipmill.synth import make_case  # noqa: E402

SHORT_CASES = ["cuts", "flash", "dissolve", "fades", "fast_motion", "static"]
# Files whose truth says nothing either way about gradual transitions (all fades): no transition precision.
TRANSITIONS_UNKNOWN = {"fades.mp4", "delayed_start.mp4"}


@dataclass
class Video:
    name: str
    path: Path
    frames: int
    cuts: list[int]
    transitions: list[tuple[int, int]]
    flashes: list[tuple[int, int]] = field(default_factory=list)
    long: bool = False

    @property
    def transitions_known(self) -> bool:
        return self.name not in TRANSITIONS_UNKNOWN


def build_corpus(workdir: Path, long_seconds: float) -> list[Video]:
    """Generate (or reuse) the synthetic videos and add the shared samples."""
    workdir.mkdir(parents=True, exist_ok=True)
    specs = [(f"syn_{c}", c, {}) for c in SHORT_CASES]
    specs.append(("syn_everything", "everything", {"scale": 2}))
    # Same mix, other seeds (content the detector was not tuned on), at another odd size.
    specs += [(f"syn_everything_s{s}", "everything", {"seed": s, "width": 480, "height": 272}) for s in (21, 22, 23)]
    scale = max(1, round(long_seconds * 25 / 555))
    specs.append(("syn_long720", "everything", {"scale": scale, "width": 1280, "height": 720, "seed": 11}))
    videos = []
    for name, case, kw in specs:
        path = workdir / f"{name}.mp4"
        meta = workdir / f"{name}.json"
        if path.exists() and meta.exists() and json.loads(meta.read_text()).get("kw") == kw:
            t = json.loads(meta.read_text())
        else:
            t0 = time.perf_counter()
            t = make_case(case, path, **kw)
            t["kw"] = kw
            meta.write_text(json.dumps(t))
            print(f"generated {name}: {t['n_frames']} frames in {time.perf_counter() - t0:.1f}s", flush=True)
        videos.append(Video(name, path, t["n_frames"], t["cuts"], [tuple(x) for x in t["transitions"]],
                            [tuple(x) for x in t["flashes"]], long=name == "syn_long720"))
    truth_file = TESTDATA / "truth.json"
    if truth_file.exists():
        for fname, t in json.loads(truth_file.read_text()).items():
            if (TESTDATA / fname).exists():
                trans = [(x["first"], x["last"]) for x in t.get("transitions", [])]
                videos.append(Video(fname, TESTDATA / fname, t["frames"], t["cuts"], trans))
    else:
        print(f"shared samples not found at {TESTDATA}: synthetic videos only", flush=True)
    return videos


# ------------------------------------------------------------------------------------------- timing


def time_decode(path: Path) -> tuple[int, float]:
    """Pure sequential PyAV decode, threaded, no conversion: (frames, seconds)."""
    t0 = time.perf_counter()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        n = sum(1 for _ in c.decode(s))
    return n, time.perf_counter() - t0


def time_detector(path: Path, detector: str):
    t0 = time.perf_counter()
    r = detect_shots(path, detector)
    return r, time.perf_counter() - t0


def scenedetect_exe() -> str:
    exe = Path(sys.executable).parent / "scenedetect"
    if not exe.exists():
        raise SystemExit(f"scenedetect CLI not found next to {sys.executable}")
    return str(exe)


def time_cli(path: Path, exe: str, tmp: Path) -> float:
    """Wall time of `scenedetect -i FILE -q detect-adaptive` (process start included)."""
    t0 = time.perf_counter()
    subprocess.run([exe, "-i", str(path), "-q", "-o", str(tmp), "detect-adaptive"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- accuracy


def match_cuts(found: list[int], truth: list[int], tol: int = 1) -> tuple[int, int, int]:
    """Greedy one-to-one matching within +-tol frames: (tp, fp, fn)."""
    free = sorted(truth)
    tp = 0
    for f in sorted(found):
        hit = next((c for c in free if abs(c - f) <= tol), None)
        if hit is not None:
            free.remove(hit)
            tp += 1
    return tp, len(found) - tp, len(truth) - tp


def overlaps(span, spans) -> bool:
    return any(span[0] <= b and span[1] >= a for a, b in spans)


def score(results: dict[str, object], videos: list[Video]) -> dict:
    """Accuracy of one detector over the videos it ran on."""
    tp = fp = fn = flash_cuts = t_total = t_found = rep = rep_ok = 0
    for v in videos:
        r = results.get(v.name)
        if r is None:
            continue
        a, b, c = match_cuts(r.cuts, v.cuts)
        tp, fp, fn = tp + a, fp + b, fn + c
        flash_cuts += sum(1 for x in r.cuts for f0, f1 in v.flashes if f0 <= x <= f1 + 1)
        t_total += len(v.transitions)
        t_found += sum(1 for t in v.transitions if overlaps(t, r.transitions))
        if v.transitions_known:
            rep += len(r.transitions)
            rep_ok += sum(1 for t in r.transitions if overlaps(t, v.transitions))
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    return {
        "videos": sum(1 for v in videos if v.name in results),
        "cut_tp": tp, "cut_fp": fp, "cut_fn": fn,
        "cut_precision": round(prec, 4), "cut_recall": round(rec, 4),
        "cut_f1": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0,
        "flash_false_cuts": flash_cuts,
        "transitions_true": t_total, "transitions_found": t_found,
        "transition_recall": round(t_found / t_total, 4) if t_total else None,
        "transitions_reported": rep,
        "transition_precision": round(rep_ok / rep, 4) if rep else None,
    }


def _transnet_subset(v: Video) -> bool:
    """transnetv2 runs ~25-50 fps on 2 CPU cores: only the short cases and the short real samples."""
    return v.frames <= 800 and not v.name.startswith(("carphone", "syn_everything_s"))


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where synthetic videos go (reused if present)")
    ap.add_argument("--long-seconds", type=float, default=90.0, help="length of the long 720p video")
    ap.add_argument("--repeat", type=int, default=2, help="timing repeats (best of) for decode and default")
    ap.add_argument("--no-cli", action="store_true", help="skip the scenedetect CLI timing")
    ap.add_argument("--no-transnet", action="store_true", help="skip the transnetv2 detector")
    args = ap.parse_args()
    t_start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "clipmill-bench-split"
    videos = build_corpus(workdir, args.long_seconds)

    # Speed: decode vs default, interleaved per file, best of --repeat.
    dec_t, ours_t, default_res = {}, {}, {}
    for _ in range(args.repeat):
        for v in videos:
            n, t = time_decode(v.path)
            if n != v.frames:
                raise SystemExit(f"{v.name}: decoded {n} frames, truth says {v.frames}")
            dec_t[v.name] = min(t, dec_t.get(v.name, float("inf")))
            r, t = time_detector(v.path, "default")
            default_res[v.name] = r
            ours_t[v.name] = min(t, ours_t.get(v.name, float("inf")))
    cli_t = {}
    if not args.no_cli:
        exe = scenedetect_exe()
        with tempfile.TemporaryDirectory() as tmp:
            for v in videos:
                cli_t[v.name] = time_cli(v.path, exe, Path(tmp))

    # Accuracy of the other detectors (timed once).
    results = {"default": default_res}
    det_time = {"default": sum(ours_t.values())}
    for det in ("content", "adaptive", "transnetv2"):
        if det == "transnetv2" and args.no_transnet:
            continue
        subset = [v for v in videos if det != "transnetv2" or _transnet_subset(v)]
        results[det], det_time[det] = {}, 0.0
        for v in subset:
            r, t = time_detector(v.path, det)
            results[det][v.name] = r
            det_time[det] += t

    # Report.
    frames_all = sum(v.frames for v in videos)
    print()
    print(f"{'video':24s} {'frames':>6s} {'decode fps':>10s} {'split fps':>10s} {'cli fps':>9s} "
          f"{'split/dec':>9s} {'split/cli':>9s}  cuts found / truth")
    for v in videos:
        d, o = v.frames / dec_t[v.name], v.frames / ours_t[v.name]
        c = v.frames / cli_t[v.name] if v.name in cli_t else float("nan")
        print(f"{v.name:24s} {v.frames:6d} {d:10.0f} {o:10.0f} {c:9.0f} {o / d:9.2f} {o / c:9.2f}  "
              f"{default_res[v.name].cuts} / {v.cuts}")
    dec_fps = frames_all / sum(dec_t.values())
    split_fps = frames_all / sum(ours_t.values())
    cli_fps = frames_all / sum(cli_t.values()) if cli_t else None
    long = [v for v in videos if v.long]
    long_fig = {}
    if long:
        lv = long[0]
        long_fig = {
            "long_video": lv.name, "long_frames": lv.frames,
            "long_decode_fps": round(lv.frames / dec_t[lv.name], 1),
            "long_split_fps": round(lv.frames / ours_t[lv.name], 1),
            "long_cli_fps": round(lv.frames / cli_t[lv.name], 1) if lv.name in cli_t else None,
        }
        long_fig["long_split_vs_decode"] = round(long_fig["long_split_fps"] / long_fig["long_decode_fps"], 3)
        if long_fig["long_cli_fps"]:
            long_fig["long_split_vs_cli"] = round(long_fig["long_split_fps"] / long_fig["long_cli_fps"], 3)
    print()
    print(f"ALL {len(videos)} videos, {frames_all} frames: decode {dec_fps:.0f} fps, split (default) "
          f"{split_fps:.0f} fps, scenedetect CLI {cli_fps or float('nan'):.0f} fps")
    print(f"  split/decode = {split_fps / dec_fps:.2f}x   split/CLI = {split_fps / cli_fps if cli_fps else float('nan'):.2f}x")
    if long_fig:
        print(f"LONG {long_fig['long_video']} ({long_fig['long_frames']} frames, 1280x720): split/decode = "
              f"{long_fig['long_split_vs_decode']:.2f}x   split/CLI = {long_fig.get('long_split_vs_cli', float('nan')):.2f}x")
    print()
    print(f"{'detector':11s} {'videos':>6s} {'fps':>6s} {'cut P':>6s} {'cut R':>6s} {'cut F1':>6s} "
          f"{'flash cuts':>10s} {'trans R':>8s} {'trans P':>8s}")
    accuracy = {}
    for det, res in results.items():
        s = score(res, videos)
        s["fps"] = round(sum(v.frames for v in videos if v.name in res) / det_time[det], 1)
        accuracy[det] = s
        tr = "-" if s["transition_recall"] is None else f"{s['transition_recall']:.3f}"
        tp = "-" if s["transition_precision"] is None else f"{s['transition_precision']:.3f}"
        print(f"{det:11s} {s['videos']:6d} {s['fps']:6.0f} {s['cut_precision']:6.3f} {s['cut_recall']:6.3f} "
              f"{s['cut_f1']:6.3f} {s['flash_false_cuts']:10d} {tr:>8s} {tp:>8s}")

    summary = {
        "videos": len(videos), "frames": frames_all, "cpu_count": os.cpu_count(),
        "decode_fps": round(dec_fps, 1), "split_fps": round(split_fps, 1),
        "cli_adaptive_fps": round(cli_fps, 1) if cli_fps else None,
        "split_vs_decode": round(split_fps / dec_fps, 3),
        "split_vs_cli": round(split_fps / cli_fps, 3) if cli_fps else None,
        **long_fig,
        "accuracy": accuracy,
        "default_detector": next(iter(default_res.values())).detector if default_res else None,
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
