"""Benchmark of captioning: clips/s and tokens/s per backend on tiny models, and the caption stage's share of a
whole-pipeline run.

Models: the tiny random Qwen2-VL of recaption/tiny.py (the same code path as real weights; its speed says how
much the machinery costs around a model, not how fast a 7B model is). Frames: `--clips` generated textured
shots, H.264-encoded and decoded by the frames code into the caption frame set (8 frames, 448 px; the backends
send `--frames` of them at `--image-side` px), torch on `--threads` CPU threads (1 by default: on a machine
shared with other work, more threads than free cores made the tiny model up to 20x slower). Measured in one run:

  * reference: the offline metadata captioner ("clipmill/metadata": colours + facts) on the same clips;
  * transformers (in process, CPU here) at each batch size of `--batch-sizes` (greedy, `--tokens` new tokens);
  * openai: the HTTP backend against recaption/server.py serving the same tiny model on 127.0.0.1, at
    concurrency 1 and 4 (the server generates one request at a time, so this measures the HTTP/JPEG/base64
    overhead and that concurrency does not break anything);
  * pipeline: `clipmill run` (the Ray runner) over `--videos` generated videos with a recipe whose caption stage
    uses the transformers backend; the caption stage's busy share = seconds spent in the caption stage / wall
    time of the run, and its share of all stage seconds (on a GPU the stage is an actor pool: a busy share near
    1 per actor means frame preparation keeps it fed; on this CPU machine every stage shares two cores). The
    stage's seconds are inference only: each worker loads the model when it builds the stage, and that load,
    Ray's start-up and the other stages are in the wall time, so a 3-video CPU run shows a small busy share;
    `frame_prep_s` (transcode + frames) is what feeds the stage.

Ratios are against the batch-1 transformers figure and the metadata reference. Prints a table, then as the LAST
line one JSON object; results also go to bench/results/caption.json.
Run: .venv/bin/python bench/caption.py [--clips 16] [--batch-sizes 1 4 8 16] [--tokens 16] [--videos 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "caption.json"


def make_frames(d: Path, n: int) -> list[list]:
    from clipmill import synth
    from clipmill.stages.caption import FRAME_SET
    from clipmill.stages.frames import decode_sets

    motions = ("pan", "static", "zoom", "fast")
    out = []
    for i in range(n):
        frames, _ = synth.render_shots([synth.Shot(24, motion=motions[i % 4])], 320, 180, seed=i)
        p = d / f"clip{i}.mp4"
        synth.write_video(p, list(frames()), fps=12)
        out.append(list(decode_sets(p.read_bytes(), [FRAME_SET], 32)[0]["caption"]))
    return out


def timed_caption(clips: list, settings) -> dict:
    from clipmill.recaption.core import caption_clips

    rows = [({"clip_duration_s": 2.0, "clip_width": 320, "clip_height": 180, "camera_motion": "pan_left"}, f)
            for f in clips]
    caption_clips(rows[:1], settings)  # warm-up: model load, first-call allocations
    t0 = time.perf_counter()
    res = caption_clips(rows, settings)
    dt = time.perf_counter() - t0
    tokens = sum(r.tokens for r in res)
    return {"clips": len(rows), "seconds": round(dt, 3), "clips_per_s": round(len(rows) / dt, 3),
            "tokens_per_s": round(tokens / dt, 2), "errors": sum(1 for r in res if r.error)}


def pipeline_share(vlm: str, d: Path, n_videos: int, tokens: int) -> dict:
    import yaml

    from clipmill import synth
    from clipmill.pipeline.inputs import expand_inputs
    from clipmill.pipeline.recipe import load_recipe
    from clipmill.pipeline.runner import run

    src = d / "videos"
    src.mkdir()
    for i in range(n_videos):
        synth.make_case(("cuts", "static", "fast_motion")[i % 3], src / f"v{i}.mp4", width=320, height=180)
    recipe = {"name": "bench-caption", "stages": [
        "probe", {"split": {"min_s": 1.0, "max_s": 3.0}}, {"transcode": {"max_side": 320}}, "frames", "quality",
        "motion", {"filter": {"reject_static": False, "min_contrast": None}},
        {"caption": {"backend": "transformers", "model": vlm, "max_new_tokens": tokens, "max_frames": 4,
                     "image_side": 224, "batch_size": 8, "threads": 1}}, "expand"],
        "write": {"shard_videos": 1}, "runtime": {"num_cpus": 2}}
    rp = d / "bench.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    stats = run(expand_inputs([str(src)]), d / "out", load_recipe(rp))
    wall = time.perf_counter() - t0
    s = stats.to_json()
    stage = s["stage_seconds"]
    cap = stage.get("caption", 0.0)
    return {"videos": n_videos, "clips": s["clips"], "kept": s["kept"], "wall_s": round(wall, 2),
            "run_elapsed_s": s["elapsed_s"], "caption_stage_s": round(cap, 2),
            "caption_busy_share": round(cap / max(s["elapsed_s"], 1e-9), 3),
            "caption_share_of_stage_seconds": round(cap / max(sum(stage.values()), 1e-9), 3),
            "frame_prep_s": round(stage.get("transcode", 0.0) + stage.get("frames", 0.0), 2),
            "stage_seconds": stage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--image-side", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the model (1: shared machine)")
    ap.add_argument("--videos", type=int, default=3, help="videos of the pipeline run (0 skips it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from clipmill.recaption.backends import clear_backends, make_backend
    from clipmill.recaption.core import CaptionSettings
    from clipmill.recaption.server import ChatServer
    from clipmill.recaption.tiny import build_tiny_vlm

    result: dict = {"clips": args.clips, "new_tokens": args.tokens, "frames_per_clip": args.frames,
                    "image_side": args.image_side, "threads": args.threads, "device": "cpu", "model": "tiny random Qwen2-VL (recaption/tiny.py)"}
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        d = Path(tmp)
        vlm = str(build_tiny_vlm(d / "vlm"))
        clips = make_frames(d, args.clips)
        result["metadata"] = timed_caption(clips, CaptionSettings())
        common = {"model": vlm, "max_new_tokens": args.tokens, "max_frames": args.frames, "image_side": args.image_side,
                  "threads": args.threads}
        sweep = {}
        for bs in args.batch_sizes:
            sweep[str(bs)] = timed_caption(clips, CaptionSettings(backend="transformers", batch_size=bs, **common))
            print(f"transformers batch {bs:3d}: {sweep[str(bs)]['clips_per_s']:.2f} clips/s, "
                  f"{sweep[str(bs)]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        result["transformers"] = sweep
        base = sweep[str(args.batch_sizes[0])]["clips_per_s"]
        result["transformers_speedup_vs_batch1"] = {k: round(v["clips_per_s"] / base, 2) for k, v in sweep.items()}
        best = max(v["clips_per_s"] for v in sweep.values())
        result["metadata_vs_best_transformers"] = round(result["metadata"]["clips_per_s"] / best, 1)
        served = CaptionSettings(backend="transformers", batch_size=1, **common)
        with ChatServer(make_backend(served, vision=True, max_images=args.frames, image_side=args.image_side),
                        model="tiny") as srv:
            http = {}
            for conc in (1, 4):
                http[str(conc)] = timed_caption(clips, CaptionSettings(
                    backend="openai", model="tiny", base_url=srv.url, concurrency=conc, max_new_tokens=args.tokens,
                    max_frames=args.frames, image_side=args.image_side, timeout_s=120))
                print(f"openai http concurrency {conc}: {http[str(conc)]['clips_per_s']:.2f} clips/s", file=sys.stderr)
        result["openai_http"] = http
        result["http_vs_inprocess_batch1"] = round(http["1"]["clips_per_s"] / base, 2)
        clear_backends()
        if args.videos:
            result["pipeline"] = pipeline_share(vlm, d, args.videos, args.tokens)
            p = result["pipeline"]
            print(f"pipeline: {p['clips']} clips, caption stage {p['caption_stage_s']} s of {p['run_elapsed_s']} s "
                  f"wall (busy share {p['caption_busy_share']}, {p['caption_share_of_stage_seconds']} of all stage "
                  f"seconds)", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
