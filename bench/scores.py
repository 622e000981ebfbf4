"""Per-stage cost of scoring: ms per clip for every stage of a recipe, against decoding the clip once.

Runs the recipe's stages in this process, without Ray, one stage at a time over the same clips (so each
stage's cost is measured alone, after its models are loaded), on generated 480x270 videos and, when present,
the shared test videos. Reference measured in the same run: decoding each clip's MP4 bytes once (every frame,
PyAV, threaded), which is the least any pixel-reading stage must pay. Also times the global dedup step on
1k/10k/100k synthetic embeddings (bench/dedup.py has the full scaling study).
Prints a table and, as the last line, one JSON object; writes bench/results/scores.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa

from clipmill import synth
from clipmill.pipeline.plan import INPUT_SCHEMA
from clipmill.pipeline.recipe import load_recipe
from clipmill.pipeline.registry import stage_class

HERE = Path(__file__).resolve().parent
TESTDATA = HERE.parents[1] / "shared" / "testdata"

SHOTS = [synth.Shot(100, "pan"), synth.Shot(90, "zoom"), synth.Shot(110, "fast"), synth.Shot(80, "static")]


def make_videos(d: Path, n: int) -> list[Path]:
    """n generated videos (15 s at 25 fps, four 3-4 s shots) plus the shared bikes/bigbuckbunny when present."""
    paths = []
    for i in range(n):
        p = d / f"v{i}.mp4"
        synth.make_shots_video(p, SHOTS, width=480, height=270, seed=300 + i)
        paths.append(p)
    paths += [TESTDATA / n for n in ("bikes.mp4", "bigbuckbunny.mp4") if (TESTDATA / n).exists()]
    return paths


def decode_once_s(media: list[bytes]) -> float:
    """Seconds to decode every frame of every clip's MP4 bytes once (the reference)."""
    t0 = time.perf_counter()
    for m in media:
        with av.open(io.BytesIO(m)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for _ in c.decode(s):
                pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--videos", type=int, default=4)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="clipmill-bench-scores-") as tmp:
        paths = make_videos(Path(tmp), args.videos)
        batch = pa.Table.from_pylist([{"uri": str(p), "source_caption": None, "error": None} for p in paths],
                                     schema=INPUT_SCHEMA)
        rows: dict[str, dict] = {}
        for spec in recipe.stages:
            cls = stage_class(spec.name)
            if cls.level == "global":
                continue
            t0 = time.perf_counter()
            stage = cls(spec.config)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            batch = stage(batch)
            run_s = time.perf_counter() - t0
            rows[spec.name] = {"level": cls.level, "load_s": load_s, "run_s": run_s}
        clips = [r for r in batch.to_pylist() if r.get("clip_index") is not None and r["clip_index"] >= 0
                 and not r.get("error")]
        n_clips = len(clips)
        errors = [r["error"] for r in batch.to_pylist() if r.get("error")]
        dec_s = decode_once_s([c["media"] for c in clips if c.get("media")])
        clip_frames = sum(c.get("clip_n_frames") or 0 for c in clips)
    total = sum(v["run_s"] for v in rows.values())
    print(f"{len(paths)} videos -> {n_clips} clips ({clip_frames} frames); errors: {len(errors)}")
    print(f"reference: decode every clip once = {dec_s / max(n_clips, 1) * 1000:.1f} ms per clip")
    print(f"{'stage':12s} {'level':7s} {'load s':>7s} {'ms/clip':>9s} {'x decode':>9s} {'share':>7s}")
    figures: dict = {"videos": len(paths), "clips": n_clips, "clip_frames": clip_frames,
                     "decode_ms_per_clip": dec_s / max(n_clips, 1) * 1000, "stages": {}, "errors": errors[:5]}
    for name, v in rows.items():
        ms = v["run_s"] / max(n_clips, 1) * 1000
        ratio = v["run_s"] / dec_s if dec_s else float("nan")
        share = v["run_s"] / total if total else 0.0
        figures["stages"][name] = {"level": v["level"], "load_s": round(v["load_s"], 3),
                                   "ms_per_clip": round(ms, 2), "x_decode": round(ratio, 3),
                                   "share": round(share, 4)}
        print(f"{name:12s} {v['level']:7s} {v['load_s']:7.2f} {ms:9.1f} {ratio:9.2f} {share:7.1%}")
    figures["dedup"] = dedup_seconds()
    print("dedup (106-d, 5% planted copies): " + ", ".join(
        f"{n} clips {v['seconds']:.2f} s (recall {v['planted_recall']:.3f})" for n, v in figures["dedup"].items()))
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(json.dumps(figures, sort_keys=True))


def dedup_seconds() -> dict:
    """Seconds of the global near-duplicate search over 1k/10k/100k synthetic 106-d embeddings (the size of
    the perceptual embedding) with 5% planted near-copies; bench/dedup.py has the full scaling study."""
    from clipmill.storage.dedup import find_duplicates

    rng = np.random.default_rng(0)
    res = {}
    for n in (1_000, 10_000, 100_000):
        base = rng.standard_normal((n, 106)).astype(np.float32)
        k = n // 20
        base[-k:] = base[:k] + 0.05 * rng.standard_normal((k, 106)).astype(np.float32)
        t0 = time.perf_counter()
        groups = find_duplicates([base[i:i + 8192] for i in range(0, n, 8192)], threshold=0.9)
        sec = time.perf_counter() - t0
        found = sum(1 for i in range(k) if groups.labels[n - k + i] == groups.labels[i])
        res[str(n)] = {"seconds": round(sec, 3), "planted": k, "planted_recall": found / k}
    return res


if __name__ == "__main__":
    main()
