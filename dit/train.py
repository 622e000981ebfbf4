"""Train the spacetime DiT on a dataset's committed shards; reads top to bottom from `train()`.

One process (`num_workers=0`, no Ray) or Ray Train's `TorchTrainer` with N DDP workers (gloo on CPU, NCCL on
GPU; multi-node when the run folder is on storage every node sees). bf16 autocast on GPU.

The run folder RUN holds:
  run.json                 the training config, model config, encoders and buckets (written at start)
  checkpoint.safetensors   model, EMA, AdamW state, per-rank generator states; metadata: step, data-sampler
                           position, loss history, configs (replaced atomically at every save)
  loss.png                 the loss curve (matplotlib, written with each checkpoint)

All randomness of the loop (timesteps, noise, text dropout, conditioning masks) comes from one torch.Generator
per rank whose state is saved, and the data order from (seed, epoch), so `resume=True` continues exactly: N
steps straight and N/2 + resume + N/2 give bitwise equal weights on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from clipmill.dit.data import BucketBatchSampler, ClipDataset, load_clips, parse_text_spec, plan_buckets
from clipmill.dit.encoders import EncoderSpec, TextEncoder, latent_encoder
from clipmill.dit.model import DiT, FlowConfig, flow_loss, preset, random_frame_masks, sample_time

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
RUN_JSON = "run.json"
FORMAT = "clipmill-dit/1"


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what to change."""


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Args:
        dataset: clipmill dataset folder (committed shards).
        run: run folder for run.json, checkpoint, loss curve.
        preset: model preset name (model.PRESETS).
        where: optional DuckDB WHERE over `clips` selecting the training clips.
        text: text column(s), e.g. "prompt_long" or "prompt_long:0.7,caption:0.3" (mixed by ratio).
        text_encoder / text_encoder_path / max_tokens: see encoders.EncoderSpec.
        latent / vae_path / vae_class: see encoders.EncoderSpec.
        frames / size: clip length and side of the buckets (None = the preset's).
        abs_pos: octaves of the model's place embedding (None = the preset's; 0 = RoPE only, for ablations).
        frame_stride: take every k-th frame of a clip.
        batch_size: clips per step per worker.
        steps: total optimisation steps.
        lr / weight_decay / warmup / grad_clip: AdamW and schedule (linear warm-up, then constant).
        ema_decay: EMA of the weights (the sampler uses the EMA).
        cfg_dropout: probability of dropping the text (classifier-free guidance).
        cond_prob: probability of a random frame-conditioning mask (i2v, extend, infill).
        logit_mean / logit_std / shift: the flow timestep distribution (model.FlowConfig).
        seed: seed of initialisation, data order and noise.
        log_every / save_every: progress and checkpoint intervals in steps.
        max_minutes: stop (and save) after this much training time, whatever `steps` says.
        num_workers: 0 = this process (no Ray); N >= 1 = Ray Train with N workers.
        use_gpu: one GPU per Ray worker (the single-process path uses CUDA when it is there).
        compile: run the training forward/backward through torch.compile (GPU: 1.8x faster on the large preset,
            after a few minutes of compilation; checkpoints are the same either way).
        resume: continue from RUN's checkpoint.
        cache_mb: decoded-clip cache per worker.
    """

    dataset: str
    run: str
    preset: str = "tiny"
    where: str | None = None
    text: str = "prompt_long,caption,source_caption"
    text_encoder: str = "minilm"
    text_encoder_path: str | None = None
    max_tokens: int = 48
    latent: str = "pixel"
    vae_path: str | None = None
    vae_class: str | None = None
    frames: int | None = None
    size: int | None = None
    abs_pos: int | None = None
    frame_stride: int = 1
    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    cond_prob: float = 0.3
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    seed: int = 0
    log_every: int = 20
    save_every: int = 500
    max_minutes: float | None = None
    num_workers: int = 0
    use_gpu: bool = False
    compile: bool = False
    resume: bool = False
    cache_mb: float = 2048

    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec(text=self.text_encoder, text_path=self.text_encoder_path, max_tokens=self.max_tokens,
                           latent=self.latent, vae_path=self.vae_path, vae_class=self.vae_class)

    def check(self) -> None:
        """Raise TrainError for values that cannot work (before any data is read)."""
        positive = ("batch_size", "steps", "frame_stride", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cfg_dropout", "cond_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise TrainError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.shift <= 0 or self.logit_std <= 0:
            raise TrainError("lr, shift and logit_std must be positive")
        if self.num_workers < 0:
            raise TrainError(f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("frames", "size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.abs_pos is not None and self.abs_pos < 0:
            raise TrainError(f"abs_pos must be >= 0, got {self.abs_pos}")
        parse_text_spec(self.text)
        self.encoder_spec()
        preset(self.preset)


# Settings a resumed run may change; everything else comes from the run's own run.json.
_RESUMABLE = ("steps", "max_minutes", "log_every", "save_every", "num_workers", "use_gpu", "cache_mb")


def train(cfg: TrainConfig) -> dict:
    """Train (in this process or through Ray Train) and return a summary dict (steps, loss, tokens/s, ...)."""
    from clipmill.dit.data import DataError  # noqa: PLC0415
    from clipmill.dit.encoders import EncoderError  # noqa: PLC0415

    try:
        cfg.check()
    except (EncoderError, DataError, ValueError) as exc:
        raise TrainError(str(exc)) from exc
    run = Path(cfg.run)
    if cfg.resume:
        if not (run / CHECKPOINT).exists():
            raise TrainError(f"nothing to resume: {run / CHECKPOINT} does not exist")
        saved = json.loads((run / RUN_JSON).read_text())["train"]
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in _RESUMABLE}, "resume": True})
    elif (run / CHECKPOINT).exists():
        raise TrainError(f"{run} already holds a checkpoint; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    if cfg.num_workers >= 1:
        return _train_ray(cfg)
    try:
        return _train_worker(cfg, rank=0, world=1)
    except (EncoderError, DataError) as exc:  # e.g. a clip the autoencoder cannot take
        raise TrainError(str(exc)) from exc


# ------------------------------------------------------------------------------------------- the loop
def _train_worker(cfg: TrainConfig, rank: int, world: int, device: torch.device | None = None) -> dict:
    """The training loop of one worker (rank 0 of 1 without Ray)."""
    from clipmill.dit.data import DataError  # noqa: PLC0415
    from clipmill.dit.encoders import EncoderError  # noqa: PLC0415

    distributed = world > 1
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Path(cfg.run)
    spec = cfg.encoder_spec()
    try:
        text_encoder = TextEncoder(spec, device)
        latent = latent_encoder(spec, device)
        clips = load_clips(cfg.dataset, cfg.text, cfg.where)
    except (EncoderError, DataError) as exc:
        raise TrainError(str(exc)) from exc
    base = preset(cfg.preset)
    patch = (1, *base.patch[1:]) if latent.t_down > 1 else base.patch  # a video VAE already compresses time
    mcfg = preset(cfg.preset, in_channels=latent.channels, text_dim=text_encoder.dim, patch=patch,
                  frames=cfg.frames or base.frames, size=cfg.size or base.size,
                  abs_pos=base.abs_pos if cfg.abs_pos is None else cfg.abs_pos)
    buckets, counts = plan_buckets(
        clips, size=mcfg.size, frames=mcfg.frames, multiple=mcfg.patch[1] * latent.s_down, t_multiple=mcfg.patch[0],
        frame_stride=cfg.frame_stride, pixel_frames=latent.pixel_frames, latent_frames=latent.latent_frames)
    dataset = ClipDataset(clips, buckets, cfg.text, frame_stride=cfg.frame_stride, seed=cfg.seed,
                          cache_mb=cfg.cache_mb)
    try:
        sampler = BucketBatchSampler(buckets, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    except DataError as exc:
        raise TrainError(str(exc)) from exc
    flow = FlowConfig(cfg.logit_mean, cfg.logit_std, cfg.shift, cfg.cond_prob)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = DiT(mcfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    step, history = 0, []
    if cfg.resume:
        meta = load_checkpoint(run / CHECKPOINT, model, ema, opt, gens={rank: gen}, world=world)
        step, history = meta["step"], meta["losses"]
        sampler.load_state(meta["sampler"])
        log.info("resumed %s at step %d", run, step)
    elif rank == 0:
        fps = float(np.median([c.fps for c in clips if c.fps > 0] or [8.0])) / cfg.frame_stride
        _write_run_json(run, cfg, mcfg, spec, counts, len(clips), model.num_params(), fps)
    if rank == 0:
        log.info("%d clips in %d buckets %s; model %s: %.1fM parameters; %d worker(s) on %s",
                 sum(counts.values()), len(counts), counts, cfg.preset, model.num_params() / 1e6, world, device)

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)  # parameters stay shared with `model`, which checkpoints and the EMA read
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    pt, ph, pw = mcfg.patch
    start, tokens_done, window, last_loss = time.monotonic(), 0, [], float("nan")
    batches = iter(sampler)
    while step < cfg.steps:
        epoch, idx = next(batches)
        videos, texts = zip(*(dataset[i, epoch] for i in idx), strict=True)
        with torch.no_grad():
            x0 = latent.encode(torch.from_numpy(np.stack(videos)))  # (B, C, T', H', W')
        tokens, text_mask = text_encoder.encode(list(texts))
        n = x0.shape[0]
        keep = torch.rand(n, generator=gen) >= cfg.cfg_dropout  # classifier-free guidance dropout
        text_mask = text_mask & keep[:, None]
        frame_mask = latent.latent_frame_mask(random_frame_masks(n, len(videos[0]), flow.cond_prob, gen))
        t = sample_time(n, flow, gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, noise, t, frame_mask = x0.to(device), noise.to(device), t.to(device), frame_mask.to(device)
        with autocast:
            loss = flow_loss(net, x0, tokens.to(device), text_mask.to(device), frame_mask, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        opt.step()
        step += 1
        _update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        window.append(float(loss.detach()))
        tokens_done += n * (x0.shape[2] // pt) * (x0.shape[3] // ph) * (x0.shape[4] // pw)
        if not math.isfinite(window[-1]):
            raise TrainError(f"loss became {window[-1]} at step {step}; lower --lr or raise --warmup")
        elapsed = time.monotonic() - start
        stop = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if distributed:
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item() > 0)
        if step % cfg.log_every == 0 or step == cfg.steps or stop:
            last_loss = float(np.mean(window))
            history.append([step, last_loss])
            window = []
            if rank == 0:
                rate = step / elapsed if elapsed else 0.0
                eta = (cfg.steps - step) / rate if rate else float("nan")
                log.info("step %d/%d  loss %.4f  %.2f step/s  %.0f tokens/s  eta %.0fs", step, cfg.steps, last_loss,
                         rate, world * tokens_done / elapsed, eta)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop:
            _save(run, model, ema, opt, gen, rank, world, step, sampler.state(), history, cfg, mcfg, spec)
        if stop:
            log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
            break
    elapsed = time.monotonic() - start
    return {"step": step, "loss": last_loss, "train_seconds": round(elapsed, 2),
            "tokens_per_s": round(world * tokens_done / max(elapsed, 1e-9), 1), "params": model.num_params(),
            "workers": world, "device": str(device), "buckets": counts}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _write_run_json(run: Path, cfg, mcfg, spec, counts, n_clips, n_params, fps) -> None:
    from clipmill.storage.shards import write_json_atomic  # noqa: PLC0415

    write_json_atomic(run / RUN_JSON, {"format": FORMAT, "train": asdict(cfg), "model": mcfg.to_dict(),
                                       "encoders": spec.to_dict(), "buckets": counts, "clips": n_clips,
                                       "params": n_params, "fps": round(fps, 3)})


def _save(run, model, ema, opt, gen, rank, world, step, sampler_state, history, cfg, mcfg, spec) -> None:
    """Gather every rank's generator state and write the checkpoint and loss curve (rank 0)."""
    states = [gen.get_state()]
    if world > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, gen.get_state())
    if rank != 0:
        return
    meta = {"step": step, "sampler": sampler_state, "losses": history, "train": asdict(cfg),
            "model": mcfg.to_dict(), "encoders": spec.to_dict(), "world": world}
    save_checkpoint(run / CHECKPOINT, model, ema, opt, dict(enumerate(states)), meta)
    write_loss_curve(history, run / "loss.png")


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, model, ema, opt, gen_states: dict[int, torch.Tensor], meta: dict) -> None:
    """Model, EMA, AdamW state and generator states in one safetensors file, written atomically."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for r, state in gen_states.items():
        tensors[f"rng.{r}"] = state.clone()
    metadata = {"format": FORMAT, "meta": json.dumps(meta), "param_groups": json.dumps(opt_state["param_groups"])}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    from clipmill.storage.shards import fsync_dir  # noqa: PLC0415

    fsync_dir(path.parent)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the parsed metadata of a checkpoint; TrainError when it is not one."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        tensors = load_file(str(path))
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise TrainError(f"cannot read checkpoint {path}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise TrainError(f"{path} is not a clipmill DiT checkpoint (format {metadata.get('format')!r})")
    meta = json.loads(metadata["meta"])
    meta["param_groups"] = json.loads(metadata["param_groups"])
    return tensors, meta


def load_checkpoint(path: Path, model=None, ema=None, opt=None, gens: dict[int, torch.Generator] | None = None,
                    world: int | None = None):
    """Load what is asked for (model, EMA, optimizer, generators by rank) from `path`; return the metadata.

    With `world`, refuse a checkpoint written by a different number of workers (the data order and the
    per-rank noise would not continue exactly).
    """
    tensors, meta = read_checkpoint(path)
    for prefix, module in (("model.", model), ("ema.", ema)):
        if module is not None:
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if opt is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if gens is not None and world is not None and meta.get("world", 1) != world:
        raise TrainError(f"checkpoint {path} was saved by {meta.get('world', 1)} worker(s), this run has {world}; "
                         f"resume with the same --num-workers")
    for r, gen in (gens or {}).items():
        if f"rng.{r}" not in tensors:
            raise TrainError(f"checkpoint {path} has no generator state for rank {r} (saved with "
                             f"{meta.get('world')} worker(s)); resume with the same --num-workers")
        gen.set_state(tensors[f"rng.{r}"])
    return meta


def write_loss_curve(history: list, path: Path) -> None:
    """Plot [[step, loss], ...] to a PNG (written atomically)."""
    if not history:
        return
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- Ray Train
def _ray_worker(config: dict) -> None:
    import ray.train  # noqa: PLC0415
    import ray.train.torch  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = ray.train.get_context()
    cfg = TrainConfig(**config["cfg"])
    summary = _train_worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, int | float)})


def _train_ray(cfg: TrainConfig) -> dict:
    """Run `_train_worker` on `num_workers` Ray Train workers (DDP); return rank 0's summary figures."""
    from ray.train import RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    run = Path(cfg.run).resolve()
    resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": {f.name: getattr(cfg, f.name) for f in fields(cfg)}},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray-train", storage_path=str(run)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 -- Ray wraps worker errors in its own exception types
        cause = exc
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise TrainError(f"distributed training failed: {type(cause).__name__}: {cause}") from exc
    _, meta = read_checkpoint(run / CHECKPOINT)  # rank 0's figures, whatever Ray kept of the reports
    summary = {"step": meta["step"], "loss": meta["losses"][-1][1] if meta["losses"] else float("nan"),
               "workers": meta["world"]}
    return {**summary, **{k: v for k, v in (result.metrics or {}).items() if k not in summary}}
