"""GPU check of the transformers caption backend: the tiny random Qwen2-VL in bfloat16 on CUDA, clips/s and tokens/s
per batch size, against the same model in float32 on CPU measured in the same run.

Needs only torch, transformers, tokenizers, numpy and pillow, plus the repository installed without its other
dependencies (`pip install --no-deps --no-build-isolation -e .`): it imports clipmill.recaption.tiny, .hf and
.textgen, which use nothing else of clipmill. Frames are random-texture RGB arrays (no video decoding here).
Also reports whether batched greedy generation gives the same text as one-by-one on the GPU (bfloat16 matrix
shapes differ with padding, so a mismatch is a numerical effect, not a bug; the CPU float32 tests assert it).

Run: python bench/caption_gpu.py [--clips 64] [--batch-sizes 1 8 32 64] [--tokens 32] [--frames 8] [--side 448]
Prints a table on stderr, then as the LAST line one JSON object; results also go to bench/results/caption_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "caption_gpu.json"


def frames(n_clips: int, n_frames: int, side: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Smooth random-colour RGB frames (side x side*9/16), one list per clip."""
    rng = np.random.default_rng(seed)
    h, w = side * 9 // 16, side
    out = []
    for _ in range(n_clips):
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        big = np.kron(base, np.ones((16, 16, 1), np.uint8))[:h, :w]
        out.append([np.roll(big, 4 * k, axis=1) for k in range(n_frames)])
    return out


def run(backend, clips: list[list[np.ndarray]]) -> dict:
    from clipmill.recaption.textgen import GenRequest

    reqs = [GenRequest("Describe the video clip in one paragraph.", system="You are a video captioner.", images=c)
            for c in clips]
    backend.generate(reqs[:backend.batch_size])  # warm-up (kernels, allocator)
    sync(backend)
    t0 = time.perf_counter()
    res = backend.generate(reqs)
    sync(backend)
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 3), "clips_per_s": round(len(reqs) / dt, 2),
            "tokens_per_s": round(sum(r.tokens for r in res) / dt, 1), "errors": sum(1 for r in res if r.error),
            "texts": [r.text for r in res]}


def sync(backend) -> None:
    import torch

    if backend.device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--cpu-clips", type=int, default=8, help="clips of the CPU float32 reference")
    args = ap.parse_args()

    import torch

    from clipmill.recaption.hf import TransformersBackend
    from clipmill.recaption.tiny import build_tiny_vlm

    if not torch.cuda.is_available():
        print("caption_gpu: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        sys.exit(2)
    clips = frames(args.clips, args.frames, args.side)
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "clips": args.clips,
                 "frames_per_clip": args.frames, "side": args.side, "new_tokens": args.tokens,
                 "model": "tiny random Qwen2-VL (recaption/tiny.py)"}
    import transformers

    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="caption-gpu-") as tmp:
        path = str(build_tiny_vlm(Path(tmp) / "vlm"))
        cpu = TransformersBackend(path, vision=True, device="cpu", dtype="float32", max_new_tokens=args.tokens,
                                  batch_size=min(8, args.cpu_clips))
        ref = run(cpu, clips[:args.cpu_clips])
        out["cpu_float32"] = {k: v for k, v in ref.items() if k != "texts"}
        print(f"cpu float32 batch {cpu.batch_size}: {ref['clips_per_s']} clips/s", file=sys.stderr)
        del cpu
        sweep = {}
        texts = {}
        for bs in args.batch_sizes:
            be = TransformersBackend(path, vision=True, device="cuda", dtype="bfloat16", max_new_tokens=args.tokens,
                                     batch_size=bs)
            torch.cuda.reset_peak_memory_stats()
            r = run(be, clips)
            texts[bs] = r.pop("texts")
            r["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            sweep[str(bs)] = r
            print(f"cuda bfloat16 batch {bs:3d}: {r['clips_per_s']} clips/s, {r['tokens_per_s']} tokens/s, "
                  f"peak {r['peak_gpu_mb']} MB", file=sys.stderr)
            del be
            torch.cuda.empty_cache()
        out["cuda_bfloat16"] = sweep
        first = args.batch_sizes[0]
        out["speedup_vs_batch1"] = {k: round(v["clips_per_s"] / sweep[str(first)]["clips_per_s"], 2)
                                    for k, v in sweep.items()}
        best = max(v["clips_per_s"] for v in sweep.values())
        out["best_gpu_vs_cpu"] = round(best / ref["clips_per_s"], 1)
        out["batched_equals_one_by_one"] = {
            str(bs): round(float(np.mean([a == b for a, b in zip(texts[bs], texts[first], strict=True)])), 3)
            for bs in args.batch_sizes}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
