"""Proof that the bundled DiT learns: toy text-to-video on coloured moving shapes, measured by a classical detector.

1. Writes a toy set (clipmill.dit.toy): 4 colours x 4 directions x {circle, square} at 64x64, 24 frames, 8 fps,
   with manifest captions ("a red circle moving left"); the colour/direction pairs in toy.HELD_OUT are left out.
2. Curates it with `clipmill run` and bench/toy_recipe.yaml (thresholds stated there).
3. Trains the tiny preset on CPU from the committed shards for a fixed time budget (8 frames at stride 3, 32x32).
4. Samples one video per caption (all 32 captions: 24 seen, 8 held-out compositions) for held-out seeds, and
   image-to-video from the first frame of freshly rendered held-out videos.
5. Measures colour (hue of the foreground) and direction (centroid trajectory) with toy.detect; chance is 25%.

Reference measured in the same run: the same sampler and detector on the untrained (step 0) weights, and chance.
`--abs-pos 0` trains the same model without its place embedding (the ablation; results go to
bench/results/toy_t2v_abs_pos0.json).
Writes bench/results/toy_t2v.json (+ a few marked MP4s when clipmill.dit.mark is available) and prints one JSON
object on its last line: color_acc, direction_acc, color_acc_heldout, direction_acc_heldout, i2v_psnr,
i2v_psnr_continuation, train_seconds, train_steps, tokens_per_s, ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def h264_roundtrip(frames: np.ndarray, fps: float, folder: Path) -> np.ndarray:
    """Frames after an H.264 encode/decode (what a viewer of an unmarked MP4 would see)."""
    from clipmill.dit.sample import read_video  # noqa: PLC0415
    from clipmill.synth import write_video  # noqa: PLC0415

    path = folder / "roundtrip.mp4"
    write_video(path, frames, fps)
    return read_video(path)


def evaluate(sampler, seeds_from: int, steps: int, cfg: float, toy) -> dict:
    """Text-to-video accuracy over every caption, split into seen and held-out colour/direction pairs."""
    hits = {"seen": [0, 0, 0], "heldout": [0, 0, 0]}  # colour hits, direction hits, count
    per_caption = []
    k = 0
    for color in toy.COLORS:
        for direction in toy.DIRECTIONS:
            for shape in toy.SHAPES:
                text = toy.caption(color, shape, direction)
                video = sampler.generate(text, steps=steps, cfg=cfg, seed=seeds_from + k)
                k += 1
                d = toy.detect(video)
                split = "heldout" if (color, direction) in toy.HELD_OUT else "seen"
                hits[split][0] += d["color"] == color
                hits[split][1] += d["direction"] == direction
                hits[split][2] += 1
                per_caption.append({"caption": text, "split": split, "color": d["color"],
                                    "direction": d["direction"]})
    return {
        "color_acc": hits["seen"][0] / hits["seen"][2], "direction_acc": hits["seen"][1] / hits["seen"][2],
        "color_acc_heldout": hits["heldout"][0] / hits["heldout"][2],
        "direction_acc_heldout": hits["heldout"][1] / hits["heldout"][2],
        "per_caption": per_caption,
    }


def evaluate_i2v(sampler, steps: int, cfg: float, toy, folder: Path, seed: int, stride: int) -> dict:
    """Image-to-video from the first frame of new renders: first-frame PSNR after H.264, continuation PSNR."""
    from clipmill.dit.data import fit_frames  # noqa: PLC0415
    from clipmill.dit.sample import image_to_video  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    first, rest, dirs, n = [], [], 0, 0
    for color in toy.COLORS:
        for direction in toy.DIRECTIONS:
            shape = toy.SHAPES[n % 2]
            truth = fit_frames(toy.render(color, direction, shape, rng=rng)[: 8 * stride: stride], 32, 32)
            video = image_to_video(sampler, toy.caption(color, shape, direction), truth[0], steps=steps, cfg=cfg,
                                   seed=seed + n)
            decoded = h264_roundtrip(video, sampler.fps, folder)
            first.append(psnr(decoded[0], truth[0]))
            rest.append(psnr(video[1:], truth[1:]))
            dirs += toy.detect(video[1:])["direction"] == direction  # the given frame alone would bias it
            n += 1
    return {"i2v_psnr": float(np.mean(first)), "i2v_psnr_continuation": float(np.mean(rest)),
            "i2v_direction_acc": dirs / n}


def write_marked_examples(sampler, toy, folder: Path, steps: int, cfg: float) -> list[str]:
    """A few MP4s through the marking writer (C2PA + watermark), when clipmill.dit.mark exists."""
    try:
        from clipmill.dit.mark import write_generated_video  # noqa: PLC0415
    except ImportError:
        return []
    from clipmill.dit.sample import extend, infill  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    red = toy.render("red", "right", rng=np.random.default_rng(7))[::2][:8]
    jobs = {
        "t2v_blue_square_moving_down.mp4": ("a blue square moving down",
                                            lambda p: sampler.generate(p, steps=steps, cfg=cfg, seed=1)),
        "extend_red_circle_forward.mp4": ("a red circle moving right",
                                          lambda p: extend(sampler, p, red, "forward", steps=steps, cfg=cfg)),
        "infill_red_circle.mp4": ("a red circle moving right",
                                  lambda p: infill(sampler, p, red[0], red[-1], steps=steps, cfg=cfg)),
    }
    for name, (prompt, make) in jobs.items():
        # shown 4x larger (pixel replication) so the frames are big enough to carry the invisible watermark
        video = np.repeat(np.repeat(make(prompt), 4, axis=1), 4, axis=2)
        write_generated_video(video, sampler.fps, folder / name, prompt=prompt, model=sampler.name,
                              extra={"upscaled": "4x pixel replication of the 32x32 sample"})
        written.append(str((folder / name).relative_to(REPO)))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget (the issue allows <= 15)")
    ap.add_argument("--per-pair", type=int, default=6, help="training videos per colour/direction pair")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--frame-stride", type=int, default=3, help="training frames are every k-th frame of a clip")
    ap.add_argument("--shift", type=float, default=3.0,
                    help="timestep shift: > 1 trains more at high noise, where the text must decide the motion")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--abs-pos", type=int, default=None,
                    help="octaves of the place embedding (default: the preset's; 0 = RoPE only, the ablation)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--workdir", default=None, help="keep the toy set, dataset and run here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipmill.dit.train").setLevel(logging.INFO)

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    from clipmill.dit import toy  # noqa: PLC0415
    from clipmill.dit.sample import Sampler  # noqa: PLC0415
    from clipmill.dit.train import TrainConfig, train  # noqa: PLC0415

    work = Path(args.workdir or tempfile.mkdtemp(prefix="toy_t2v_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = toy.make_toy_set(work / "videos", per_pair=args.per_pair, seed=0)
    print(f"toy set: {len(rows)} videos in {time.monotonic() - t0:.1f}s", file=sys.stderr)

    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "clipmill", "run", str(work / "videos" / "manifest.jsonl"),
                           "-o", str(work / "ds"), "--recipe", str(REPO / "bench" / "toy_recipe.yaml")],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"curation failed: {proc.stderr[-2000:]}")
    curate_s = time.monotonic() - t0
    print(f"curated in {curate_s:.1f}s", file=sys.stderr)

    run = work / "run"
    cfg = TrainConfig(dataset=str(work / "ds"), run=str(run), preset="tiny", text="source_caption",
                      frame_stride=args.frame_stride, batch_size=args.batch_size, steps=100000, lr=args.lr, warmup=50,
                      ema_decay=0.995, cfg_dropout=0.1, cond_prob=0.3, shift=args.shift, log_every=25, save_every=0,
                      max_minutes=args.minutes, seed=0, abs_pos=args.abs_pos,
                      resume=(run / "checkpoint.safetensors").exists())
    summary = train(cfg)
    print(f"trained: {summary}", file=sys.stderr)

    # reference: the untrained weights through the same sampler and detector
    from clipmill.dit.model import DiT  # noqa: PLC0415

    untrained = Sampler(run)
    torch.manual_seed(cfg.seed)
    untrained.model.load_state_dict(DiT(untrained.cfg).state_dict())
    t0 = time.monotonic()
    ref = evaluate(untrained, 5000, args.steps, args.cfg, toy)
    sampler = Sampler(run)
    res = evaluate(sampler, 1000, args.steps, args.cfg, toy)
    i2v = evaluate_i2v(sampler, args.steps, args.cfg, toy, work, seed=4242, stride=args.frame_stride)
    sample_s = time.monotonic() - t0
    ablation = args.abs_pos is not None  # a non-default model: its figures go to their own file, no examples
    examples = [] if ablation else write_marked_examples(sampler, toy, RESULTS / "toy_t2v", args.steps, args.cfg)

    out = {
        "color_acc": round(res["color_acc"], 3), "direction_acc": round(res["direction_acc"], 3),
        "color_acc_heldout": round(res["color_acc_heldout"], 3),
        "direction_acc_heldout": round(res["direction_acc_heldout"], 3),
        "i2v_psnr": round(i2v["i2v_psnr"], 2), "i2v_psnr_continuation": round(i2v["i2v_psnr_continuation"], 2),
        "i2v_direction_acc": round(i2v["i2v_direction_acc"], 3),
        "chance": 0.25, "color_vs_chance": round(res["color_acc"] / 0.25, 2),
        "direction_vs_chance": round(res["direction_acc"] / 0.25, 2),
        "untrained_color_acc": round(ref["color_acc"], 3), "untrained_direction_acc": round(ref["direction_acc"], 3),
        "train_seconds": summary["train_seconds"], "train_steps": summary["step"], "final_loss": summary["loss"],
        "tokens_per_s": summary["tokens_per_s"], "params": summary["params"], "batch_size": args.batch_size,
        "torch_threads": args.threads, "shift": args.shift, "lr": args.lr,
        "abs_pos": untrained.cfg.abs_pos, "frame_stride": args.frame_stride,
        "curate_seconds": round(curate_s, 1), "sample_seconds": round(sample_s, 1),
        "train_videos": len(rows), "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "marked_examples": examples, "targets": {"color_acc": 0.9, "direction_acc": 0.8},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"toy_t2v_abs_pos{args.abs_pos}.json" if ablation else "toy_t2v.json"
    (RESULTS / name).write_text(json.dumps({**out, "per_caption": res["per_caption"]}, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
