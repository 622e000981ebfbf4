"""CLI commands of the bundled DiT: `clipmill train DATASET --out RUN` and `clipmill sample RUN -o out.mp4`.

Registered in pipeline/cli.py's `_COMMANDS`; torch, transformers and Ray are imported inside the commands so
`clipmill --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys

import click


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"clipmill: error: {msg}", err=True)
    sys.exit(code)


def _show_progress() -> None:
    """INFO from the trainer/sampler reaches the terminal even without -v (training progress and loss)."""
    for name in ("clipmill.dit.train", "clipmill.dit.sample"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s", stream=sys.stderr)


# ------------------------------------------------------------------------------------------------- train
@click.command("train")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "run", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoint, loss.png).")
@click.option("--where", default=None, help='DuckDB WHERE over `clips` selecting the training clips, e.g. "aesthetic_score > 5".')
@click.option("--preset", default="tiny", show_default=True, help="Model size: tiny, small, base, large, xl.")
@click.option("--text", default="prompt_long,caption,source_caption", show_default=True,
              help='Text column(s) to train on, mixed by ratio: "prompt_long:0.7,caption:0.3".')
@click.option("--text-encoder", default="minilm", show_default=True, help="minilm (packaged), t5 or clip.")
@click.option("--text-encoder-path", default=None, help="Weights folder of a t5/clip text encoder.")
@click.option("--latent", default="pixel", show_default=True, help="pixel (no autoencoder), vae or video-vae.")
@click.option("--vae-path", default=None, help="Weights folder of a diffusers autoencoder.")
@click.option("--frames", type=int, default=None, help="Clip length of the buckets (default: the preset's).")
@click.option("--size", type=int, default=None, help="Side of the buckets in pixels (default: the preset's).")
@click.option("--frame-stride", type=int, default=1, show_default=True, help="Use every k-th frame.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Clips per step per worker.")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--warmup", type=int, default=100, show_default=True)
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
@click.option("--cfg-dropout", type=float, default=0.1, show_default=True, help="Text dropout for CFG.")
@click.option("--cond-prob", type=float, default=0.3, show_default=True,
              help="Share of samples trained with given frames (image-to-video, extend, infill).")
@click.option("--shift", type=float, default=1.0, show_default=True, help="Timestep shift (> 1 for big videos).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=20, show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop (and save) after this much training time.")
@click.option("--num-workers", type=int, default=0, show_default=True,
              help="0: this process; N: Ray Train with N DDP workers (RAY_ADDRESS for a cluster).")
@click.option("--use-gpu", is_flag=True, help="One GPU per Ray Train worker.")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the training step (GPU: ~1.8x faster on the large preset after compiling).")
@click.option("--resume", is_flag=True, help="Continue RUN's checkpoint exactly.")
def train_command(dataset, run, **opts) -> None:
    """Train the bundled DiT on the kept clips of DATASET (optionally filtered by --where)."""
    from clipmill.dit.train import TrainConfig, TrainError, train  # noqa: PLC0415

    _show_progress()
    try:
        summary = train(TrainConfig(dataset=dataset, run=run, **opts))
    except TrainError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"interrupted; the last checkpoint in {run} can be continued with --resume", code=130)
    click.echo(json.dumps(summary))


# ------------------------------------------------------------------------------------------------ sample
@click.command("sample")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="What the video shows.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="MP4 to write (.mp4).")
@click.option("--frames", type=int, default=None, help="Frames to generate (default: the training length).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--steps", type=int, default=30, show_default=True, help="Euler steps of the flow ODE.")
@click.option("--cfg", type=float, default=4.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fps", type=float, default=None, help="Frame rate of the MP4 (default: the training clips').")
@click.option("--expand", is_flag=True, help="Expand the prompt into a dense caption first (recaption).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="First frame (image-to-video).")
@click.option("--video", type=click.Path(exists=True, dir_okay=False), help="Clip to extend (with --extend).")
@click.option("--extend", type=click.Choice(["forward", "backward"]), default=None)
@click.option("--first", type=click.Path(exists=True, dir_okay=False), help="First frame of an infill.")
@click.option("--last", type=click.Path(exists=True, dir_okay=False), help="Last frame of an infill.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("--c2pa-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate chain signing the C2PA manifest (default: CLIPMILL_C2PA_CERT, else a local one).")
@click.option("--c2pa-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM private key of --c2pa-cert.")
def sample_command(run, prompt, output, frames, height, width, steps, cfg, seed, fps, expand, image, video, extend,
                   first, last, no_ema, c2pa_cert, c2pa_key) -> None:
    """Generate a video from RUN: text-to-video, --image (i2v), --video --extend, --first --last (infill)."""
    if not output.lower().endswith(".mp4"):
        _fail(f"--output must be an .mp4 file, got {output}")
    if bool(video) != bool(extend):
        _fail("--video and --extend go together (--video clip.mp4 --extend forward|backward)")
    if bool(first) != bool(last):
        _fail("--first and --last go together (the two frames to fill between)")
    if sum(bool(x) for x in (image, video, first)) > 1:
        _fail("choose one of --image, --video/--extend, --first/--last")
    _show_progress()
    try:
        from clipmill.dit.mark import (  # noqa: PLC0415
            GenerationRefused,
            MarkError,
            SignerConfig,
            check_prompt,
            write_generated_video,
        )
    except ImportError as exc:
        _fail(f"the marking module (clipmill.dit.mark) is unavailable: {exc}")
    from clipmill.dit import sample as dit_sample  # noqa: PLC0415
    from clipmill.dit.sample import SampleError, Sampler  # noqa: PLC0415

    if expand:
        try:
            from clipmill.recaption import expand_prompt  # noqa: PLC0415
        except ImportError as exc:
            _fail(f"--expand needs the recaption module's expand_prompt, which is unavailable: {exc}")
        expanded = expand_prompt(prompt)
        logging.getLogger("clipmill.dit.sample").info("expanded prompt (%s): %s", expanded.model, expanded.long)
        prompt_used = expanded.long
    else:
        prompt_used = prompt
    try:
        check_prompt(prompt)
        if prompt_used != prompt:
            check_prompt(prompt_used)
    except GenerationRefused as exc:
        _fail(f"refused: {exc}")
    try:
        signer = SignerConfig.resolve(c2pa_cert, c2pa_key)
    except MarkError as exc:
        _fail(str(exc))
    try:
        sampler = Sampler(run, ema=not no_ema)
        kw = {"frames": frames, "height": height, "width": width, "steps": steps, "cfg": cfg, "seed": seed}
        if image:
            out = dit_sample.image_to_video(sampler, prompt_used, dit_sample.read_image(image), **kw)
        elif video:
            out = dit_sample.extend(sampler, prompt_used, dit_sample.read_video(video), extend, **kw)
        elif first:
            out = dit_sample.infill(sampler, prompt_used, dit_sample.read_image(first),
                                     dit_sample.read_image(last), **kw)
        else:
            out = sampler.generate(prompt_used, **kw)
        info = write_generated_video(out, fps or sampler.fps, output, prompt=prompt, model=sampler.name,
                                     signer=signer, extra={"prompt_used": prompt_used, "seed": seed,
                                                           "steps": steps, "cfg": cfg})
    except (SampleError, MarkError, ValueError) as exc:  # SampleError is a ValueError: bad sizes, fps, files
        _fail(str(exc))
    except GenerationRefused as exc:
        _fail(f"refused: {exc}")
    wm = (info or {}).get("watermark") or {}
    if wm.get("embedded") and not wm.get("detected"):
        click.echo(f"clipmill: warning: the invisible watermark did not survive H.264 encoding of this content "
                   f"(bit accuracy {wm.get('bit_accuracy', 0):.0%}; near-white or saturated frames lose it in 4:2:0 "
                   f"chroma); the C2PA manifest still marks {output} as AI-generated", err=True)
    click.echo(json.dumps({"output": str(output), "frames": int(out.shape[0]), "height": int(out.shape[1]),
                           "width": int(out.shape[2]), "watermark_detected": wm.get("detected"),
                           "watermark_payload": wm.get("payload"),
                           **{k: v for k, v in (info or {}).items() if isinstance(v, str | int | float | bool)}}))

