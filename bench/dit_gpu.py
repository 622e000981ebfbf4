"""GPU training throughput and model FLOPs utilisation (MFU) of the bundled DiT, bf16 autocast.

Self-contained: needs only torch; loads dit/model.py from its path (that file imports nothing of clipmill), so it
runs on a machine where clipmill is not installed:

    python3 bench/dit_gpu.py                        # presets small, base, large; ~1-2 minutes on an H100/H200
    python3 bench/dit_gpu.py --presets base --compile

Workload: one training step of the real objective (model.flow_loss, random frame-conditioning masks, text
tokens with padding) on latents shaped like a video VAE's output (16 channels, 8 latent frames of 32 x 32,
i.e. 29 frames at 256x256 through a 4x temporal, 8x spatial VAE; see --latent), 64 text tokens of width 768,
AdamW (fused on CUDA), fp32 master weights under bf16 autocast, as clipmill's trainer runs it.

FLOPs per step are counted by torch.utils.flop_counter.FlopCounterMode on one forward+backward (matmuls,
convolutions and scaled-dot-product attention) and also estimated analytically (6 x per-token parameters x tokens
+ 12 x layers x L^2 x D per sample for self-attention + cross-attention); MFU = counted FLOPs/s / peak. The peak
is the dense bf16 figure of the card (H100/H200 SXM 989 TFLOP/s, A100 312) or --peak-tflops.
Reference measured in the same run: the first preset in fp32 (TF32 off), printed as the bf16 speed-up.
Writes bench/results/dit_gpu.json when that folder is writable and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def load_model_module():
    spec = importlib.util.spec_from_file_location("clipmill_dit_model", ROOT / "dit" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def analytic_flops(cfg, batch: int, tokens: int, text_len: int) -> float:
    """6 x (per-token parameters) x tokens + attention score/value FLOPs (x3 for forward + backward)."""
    d, depth = cfg.width, cfg.depth
    hidden = int(d * cfg.mlp_ratio)
    per_token = depth * (3 * d * d + d * d + d * d + d * d + 2 * d * hidden)  # qkv, out, cross q, cross out, mlp
    per_token += (2 * cfg.in_channels + 1) * math.prod(cfg.patch) * d + d * math.prod(cfg.patch) * cfg.in_channels
    per_text = depth * 2 * d * d + 2 * cfg.text_dim * d + d * d  # cross k/v and the text projector
    dense = 6 * batch * (per_token * tokens + per_text * text_len)
    attention = 3 * batch * depth * (4 * tokens * tokens * d + 4 * tokens * text_len * d)
    return float(dense + attention)


def make_step(mod, model, opt, batch, latent_shape, text_len, text_dim, device, dtype):
    """A closure running one optimisation step on fixed random data (timesteps/noise drawn on the device)."""
    c, t, h, w = latent_shape
    x0 = torch.randn(batch, c, t, h, w, device=device)
    text = torch.randn(batch, text_len, text_dim, device=device)
    lengths = torch.randint(8, text_len + 1, (batch,), device=device)
    text_mask = torch.arange(text_len, device=device)[None] < lengths[:, None]
    frame_mask = mod.random_frame_masks(batch, t, 0.3).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step():
        tt = torch.sigmoid(torch.randn(batch, device=device))
        noise = torch.randn_like(x0)
        with autocast:
            loss = mod.flow_loss(model, x0, text, text_mask, frame_mask, tt, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mod, name, batch, latent_shape, text_len, text_dim, device, dtype, steps, compile_model, peak):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = mod.preset(name, in_channels=latent_shape[0], text_dim=text_dim)
    model = mod.DiT(cfg).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    net = torch.compile(model) if compile_model else model
    step = make_step(mod, net, opt, batch, latent_shape, text_len, text_dim, device, dtype)
    c, t, h, w = latent_shape
    pt, ph, pw = cfg.patch
    tokens = (t // pt) * (h // ph) * (w // pw)
    # FLOPs are counted on the eager model: a compiled module called under FlopCounterMode runs eagerly and
    # stays uncompiled afterwards (the first version of this script measured no compile speed-up for that reason)
    counter = FlopCounterMode(display=False)
    with counter:
        make_step(mod, model, opt, batch, latent_shape, text_len, text_dim, device, dtype)()
    counted = float(counter.get_total_flops())
    t_compile = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warm_s = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: loss is {loss.item()}")
    step_s = elapsed / steps
    flops_s = counted / step_s
    return {
        "preset": name, "dtype": str(dtype).replace("torch.", ""), "compiled": compile_model,
        "params_m": round(model.num_params() / 1e6, 1), "batch": batch, "tokens_per_sample": tokens,
        "step_ms": round(1000 * step_s, 1), "tokens_per_s": round(batch * tokens / step_s),
        "samples_per_s": round(batch / step_s, 2), "tflops_counted_per_step": round(counted / 1e12, 3),
        "tflops_analytic_per_step": round(analytic_flops(cfg, batch, tokens, text_len) / 1e12, 3),
        "achieved_tflops": round(flops_s / 1e12, 1), "mfu": round(flops_s / peak, 4) if peak else None,
        "warmup_s": round(warm_s, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,base,large")
    ap.add_argument("--batch", default="small:32,base:16,large:8,xl:8,tiny:4", help="per-preset batch sizes")
    ap.add_argument("--latent", default="16,8,32,32", help="latent C,T,H,W per sample (29 frames at 256x256 "
                                                            "through a 4x temporal, 8x spatial video VAE)")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--text-dim", type=int, default=768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (adds compile time)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, TFLOP/s")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    mod = load_model_module()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in gpu), None)
    batches = dict((k, int(v)) for k, v in (item.split(":") for item in args.batch.split(",")))
    latent = tuple(int(v) for v in args.latent.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    presets = args.presets.split(",")
    for i, name in enumerate(presets):
        bf16 = measure(mod, name, batches.get(name, 8), latent, args.text_len, args.text_dim, device,
                       torch.bfloat16, args.steps, False, peak)
        if i == 0:  # the reference of this run: the same step in fp32
            fp32 = measure(mod, name, batches.get(name, 8), latent, args.text_len, args.text_dim, device,
                           torch.float32, max(3, args.steps // 2), False, peak)
            bf16["fp32_tokens_per_s"] = fp32["tokens_per_s"]
            bf16["bf16_speedup_vs_fp32"] = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 2)
        print(json.dumps(bf16), flush=True)
        results.append(bf16)
        if args.compile:
            comp = measure(mod, name, batches.get(name, 8), latent, args.text_len, args.text_dim, device,
                           torch.bfloat16, args.steps, True, peak)
            comp["speedup_vs_eager"] = round(comp["tokens_per_s"] / bf16["tokens_per_s"], 2)
            print(json.dumps(comp), flush=True)
            results.append(comp)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {"device": gpu, "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None,
               "latent": list(latent), "text_len": args.text_len, "results": results,
               "best_mfu": max((r["mfu"] or 0) for r in results) if peak else None}
    try:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "dit_gpu.json").write_text(json.dumps(summary, indent=1))
    except OSError:
        pass
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
