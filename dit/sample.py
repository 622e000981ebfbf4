"""Sample videos from a trained run: text-to-video, image-to-video, extension forward/backward, infilling.

`Sampler(run)` loads the run's checkpoint (EMA weights by default) and rebuilds its text and latent encoders.
`Sampler.generate` integrates the flow ODE with classifier-free guidance; frames given by the user (a first
image, the end of a clip, two end frames) enter through the same masked frame conditioning that training
taught, and are pasted into the result. The helpers `image_to_video`, `extend` and `infill` build those masks.
Writing MP4s is not done here: the CLI passes frames to `clipmill.dit.mark.write_generated_video`, which
checks them, watermarks them and adds the C2PA manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from clipmill.dit.data import fit_frames
from clipmill.dit.encoders import EncoderError, EncoderSpec, TextEncoder, latent_encoder
from clipmill.dit.model import DiT, DiTConfig, sample_flow
from clipmill.dit.train import CHECKPOINT, RUN_JSON, TrainError, read_checkpoint

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sampling request cannot be served (bad size, missing run, ...); the message says what to change."""


class Sampler:
    """A trained DiT with its encoders, ready to generate videos."""

    def __init__(self, run: str | Path, *, device: str | torch.device | None = None, ema: bool = True):
        run = Path(run)
        if not (run / CHECKPOINT).is_file():
            raise SampleError(f"{run} has no {CHECKPOINT}; train one with `clipmill train DATASET --out {run}`")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            tensors, meta = read_checkpoint(run / CHECKPOINT)
        except TrainError as exc:
            raise SampleError(str(exc)) from exc
        self.cfg = DiTConfig(**meta["model"])
        self.spec = EncoderSpec(**meta["encoders"])
        self.step = int(meta["step"])
        self.shift = float(meta["train"].get("shift", 1.0))
        info = json.loads((run / RUN_JSON).read_text()) if (run / RUN_JSON).is_file() else {}
        self.fps = float(info.get("fps") or 8.0)
        self.name = f"clipmill-dit {meta['train'].get('preset', '?')} ({run.name}, step {self.step})"
        self.model = DiT(self.cfg)
        prefix = "ema." if ema else "model."
        self.model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.model.eval().requires_grad_(False).to(self.device)
        try:
            self.text_encoder = TextEncoder(self.spec, self.device)
            self.latent = latent_encoder(self.spec, self.device)
        except EncoderError as exc:
            raise SampleError(str(exc)) from exc

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise SampleError unless the model can generate (frames, height, width)."""
        pt, ph, pw = self.cfg.patch
        s = self.latent.s_down
        if height % (ph * s) or width % (pw * s) or height < 1 or width < 1:
            raise SampleError(f"height and width must be positive multiples of {ph * s} for this model "
                              f"(got {height}x{width})")
        latent_t = self.latent.latent_frames(frames)
        if frames < 1 or latent_t % pt or self.latent.pixel_frames(latent_t) != frames:
            ok = [self.latent.pixel_frames(k * pt) for k in range(1, 5)]
            raise SampleError(f"--frames {frames} does not fit this model; use e.g. {', '.join(map(str, ok))}, ...")

    @torch.no_grad()
    def generate(self, prompt: str, *, frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int = 30, cfg: float = 4.0, seed: int = 0,
                 given: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """uint8 (frames, height, width, 3) RGB for `prompt`; `given` maps frame index -> RGB image to keep."""
        frames = frames or self.cfg.frames
        height, width = height or self.cfg.size, width or self.cfg.size
        self.check_size(frames, height, width)
        if steps < 1:
            raise SampleError(f"--steps must be >= 1, got {steps}")
        video = np.zeros((1, frames, height, width, 3), np.uint8)
        mask = torch.zeros(1, frames)
        for index, image in (given or {}).items():
            if not -frames <= index < frames:
                raise SampleError(f"given frame {index} outside the {frames} frames to generate")
            video[0, index] = fit_frames(np.asarray(image)[None], height, width)[0]
            mask[0, index] = 1
        cond, frame_mask = None, None
        if given:
            try:
                cond = self.latent.encode(torch.from_numpy(video)).to(self.device)
            except EncoderError as exc:
                raise SampleError(str(exc)) from exc
            frame_mask = self.latent.latent_frame_mask(mask).to(self.device)
        tokens, text_mask = self.text_encoder.encode([prompt])
        tokens, text_mask = tokens.to(self.device), text_mask.to(self.device)
        gen = torch.Generator().manual_seed(seed)
        shape = (1, self.cfg.in_channels, self.latent.latent_frames(frames), height // self.latent.s_down,
                 width // self.latent.s_down)
        noise = torch.randn(shape, generator=gen).to(self.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        with autocast:
            latent = sample_flow(self.model, noise, tokens, text_mask, torch.zeros_like(text_mask), steps=steps,
                                 cfg=cfg, shift=self.shift, cond=cond, frame_mask=frame_mask)
        out = self.latent.decode(latent.float())[0]
        for index in (given or {}):  # exact pixels of the given frames (a VAE round trip would blur them)
            out[index] = video[0, index]
        return out


# ------------------------------------------------------------------------------------- conditioning modes
def image_to_video(sampler: Sampler, prompt: str, image: np.ndarray, **kw) -> np.ndarray:
    """A video whose first frame is `image`."""
    return sampler.generate(prompt, given={0: image}, **kw)


def infill(sampler: Sampler, prompt: str, first: np.ndarray, last: np.ndarray, **kw) -> np.ndarray:
    """A video from `first` to `last`, generating the frames between them."""
    return sampler.generate(prompt, given={0: first, -1: last}, **kw)


def extend(sampler: Sampler, prompt: str, clip: np.ndarray, direction: str, *, frames: int | None = None,
           context: int | None = None, **kw) -> np.ndarray:
    """The clip with new frames after it (``forward``) or before it (``backward``).

    A window of `frames` is generated whose first (forward) or last (backward) `context` frames are the clip's
    last (first) ones; the result is the whole clip plus the window's new frames, at the window's size.
    """
    if direction not in ("forward", "backward"):
        raise SampleError(f"--extend must be forward or backward, got {direction!r}")
    frames = frames or sampler.cfg.frames
    context = min(len(clip), context or max(1, frames // 2), frames - 1)
    if context < 1:
        raise SampleError(f"cannot extend with a window of {frames} frame(s)")
    if direction == "forward":
        given = {i: clip[len(clip) - context + i] for i in range(context)}
    else:
        given = {frames - context + i: clip[i] for i in range(context)}
    window = sampler.generate(prompt, frames=frames, given=given, **kw)
    h, w = window.shape[1:3]
    clip = fit_frames(np.asarray(clip), h, w)
    if direction == "forward":
        return np.concatenate([clip, window[context:]])
    return np.concatenate([window[:frames - context], clip])


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file; SampleError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise SampleError(f"cannot read image {path}: {exc}") from exc


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3); SampleError when it cannot be decoded."""
    import av  # noqa: PLC0415

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (OSError, av.error.FFmpegError, IndexError) as exc:
        raise SampleError(f"cannot decode video {path}: {exc}") from exc
    if not frames:
        raise SampleError(f"video {path} has no frames")
    return np.stack(frames)
