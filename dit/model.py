"""The spacetime Diffusion Transformer: one readable file (model, flow objective, presets).

A video latent ``(N, C, T, H, W)`` is cut into spacetime patches by a 3D convolution, run through transformer
blocks with adaLN-Zero timestep conditioning (DiT), cross-attention to text-encoder tokens (PixArt-alpha) and
rotary position embedding over (t, h, w) so any frame count, height and width works at inference (plus the
patch's place in the clip as a fraction of the grid, which RoPE alone does not give), and turned
back into a velocity of the same shape. Attention is ``torch.nn.functional.scaled_dot_product_attention``.

Masked frame conditioning: besides the noisy latent, every patch sees the clean latent of the frames that
are given (zeros elsewhere) and a per-frame mask channel. Training draws random masks (none, first frame,
first/last frames, a prefix, a suffix), so one model does text-to-video, image-to-video, extension forward or
backward in time and infilling between two frames.

Objective: rectified flow / flow matching (x_t = (1 - t) x_0 + t noise, target v = noise - x_0), t from a
logit-normal distribution optionally shifted towards noise (SD3); the loss covers only frames not given.

This file imports only ``torch`` and ``math`` so a benchmark can load it by path without clipmill.

References:
  W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers" (DiT), 2023 -- adaLN-Zero.
  J. Chen et al., "PixArt-alpha", 2023 -- cross-attention to T5 tokens in DiT blocks.
  J. Su et al., "RoFormer", 2021 -- rotary position embedding; here factorised over (t, h, w).
  X. Liu et al., "Flow Straight and Fast" (rectified flow), 2022; Y. Lipman et al., "Flow Matching", 2022.
  P. Esser et al., "Scaling Rectified Flow Transformers" (SD3), 2024 -- logit-normal t and the shift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DiTConfig:
    """Architecture (and the default training clip shape) of one DiT."""

    in_channels: int = 3  # latent channels C (3 in pixel space; 4/16 for image/video VAEs); set by the encoder
    patch: tuple[int, int, int] = (1, 4, 4)  # (t, h, w) patch size; T, H, W of the latent must be multiples
    width: int = 128  # model dimension D
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads; D / heads must be divisible into three even RoPE parts
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * D
    text_dim: int = 384  # width of the text encoder's token states (MiniLM 384, T5-base 768); set by the encoder
    rope_theta: float = 10000.0  # RoPE base; 10k is enough for a few hundred positions per axis
    abs_pos: int = 0  # octaves of Fourier features of each patch's place in the clip, (t, h, w) in [0, 1]; 0 = off
    frames: int = 8  # default training frames per clip (any count works at inference thanks to RoPE)
    size: int = 32  # default training side: buckets have about size*size pixels at the clip's aspect ratio

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints (t, h, w), got {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        head_dim = self.width // self.heads
        if head_dim < 12 or head_dim % 2:
            raise ValueError(f"head dim {head_dim} (width/heads) must be even and >= 12 for 3-axis RoPE")
        if self.abs_pos < 0:
            raise ValueError(f"abs_pos must be >= 0 octaves, got {self.abs_pos}")

    def to_dict(self) -> dict:
        return asdict(self)


# Presets: tiny runs the CPU tests and the toy benchmark; small/base/large/xl are DiT-S/B/L/XL-sized and need GPUs.
# All use the absolute place embedding (abs_pos) besides RoPE: RoPE alone only tells a patch where the others are
# relative to it, and from pure noise (t = 1) a model that cannot tell the left edge from the right one cannot
# put "a circle moving left" on the right side of the first frame. Measured on the toy benchmark (README): without
# it the predicted clean mean at t = 1 was the same for all four directions after 670 steps and only partly right
# after 2000, and held-out colour/direction pairs moved the right way 50% of the time instead of 100%.
PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(patch=(2, 4, 4), width=128, depth=4, heads=4, frames=8, size=32, abs_pos=4),
    "small": DiTConfig(patch=(1, 2, 2), width=384, depth=12, heads=6, frames=16, size=256, abs_pos=4),
    "base": DiTConfig(patch=(1, 2, 2), width=768, depth=12, heads=12, frames=16, size=256, abs_pos=4),
    "large": DiTConfig(patch=(1, 2, 2), width=1024, depth=24, heads=16, frames=16, size=256, abs_pos=4),
    "xl": DiTConfig(patch=(1, 2, 2), width=1152, depth=28, heads=16, frames=16, size=256, abs_pos=4),
}


def preset(name: str, **overrides) -> DiTConfig:
    """A copy of preset `name` with fields overridden (e.g. in_channels/text_dim from the encoders)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return DiTConfig(**{**PRESETS[name].to_dict(), **overrides})


# ------------------------------------------------------------------------------------ embedding layers
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DDPM steps): (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Flow time t -> conditioning vector (N, D)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class TextProjector(nn.Module):
    """Text tokens (N, L, text_dim) -> (N, 1 + L, D) keys for cross-attention, plus a pooled vector (N, D).

    A learned null token is always the first key, so a prompt dropped for classifier-free guidance (all
    text masked) still has one key to attend to.
    """

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        self.pool = nn.Linear(text_dim, width)
        self.null = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = tokens.shape[0]
        keys = torch.cat([self.null.expand(n, -1, -1).to(tokens.dtype), self.proj(tokens)], dim=1)  # (N, 1+L, D)
        key_mask = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=mask.device), mask], dim=1)  # (N, 1+L)
        m = mask.to(tokens.dtype)[..., None]
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)  # (N, text_dim); zeros when dropped
        return keys, key_mask, self.pool(pooled)


# ---------------------------------------------------------------------------------------- rotary (t, h, w)
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (t, h, w) axes: even numbers, h and w equal, t takes the rest."""
    hw = (head_dim // 3) // 2 * 2
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim/2) for a (T', H', W') patch grid, flattened in t, h, w order."""
    tables = []
    for n, d in zip(grid, rope_split(head_dim), strict=True):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)  # (d/2,)
        tables.append(torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv))  # (n, d/2)
    t, h, w = grid
    ang = torch.cat([
        tables[0][:, None, None].expand(t, h, w, -1),
        tables[1][None, :, None].expand(t, h, w, -1),
        tables[2][None, None, :].expand(t, h, w, -1),
    ], dim=-1).reshape(t * h * w, head_dim // 2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (N, heads, L, hd) by the angles in cos/sin (L, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (N, heads, L, hd/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class PlaceEmbedding(nn.Module):
    """Where a patch is in the clip: Fourier features of its (t, h, w) centre as a fraction of the grid -> (L, D).

    Fractions, not indices, so the embedding means the same place (the left edge, the last frame) at any frame
    count and size; sin/cos of 2^k * pi * u for k < octaves on each axis, then a linear map to the model width.
    """

    def __init__(self, octaves: int, width: int):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(octaves, dtype=torch.float32)) * math.pi, persistent=False)
        self.proj = nn.Linear(6 * octaves, width)

    def features(self, grid: tuple[int, int, int], device=None) -> torch.Tensor:
        axes = [(torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n for n in grid]
        u = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3) in t, h, w order
        ang = u[..., None] * self.freqs.to(device)  # (L, 3, octaves)
        return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(1)  # (L, 6 * octaves)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj.weight.dtype))


# ------------------------------------------------------------------------------------------------ blocks
class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight follows the input dtype, so bf16 autocast keeps the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over all spacetime patches, with QK-RMSNorm and 3D RoPE."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, L, hd)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, hd)
        return self.out(y.transpose(1, 2).reshape(n, length, d))


class CrossAttention(nn.Module):
    """Patches (queries) attend to text keys; `key_mask` (N, S) is True for keys that may be attended to."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, text: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        hd = d // self.heads
        q = self.q_norm(self.q(x).view(n, length, self.heads, hd).transpose(1, 2))  # (N, h, L, hd)
        k, v = self.kv(text).view(n, text.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (N, h, S, hd)
        y = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=key_mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(n, length, d))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP (modulated by c), with plain pre-norm cross-attention between them."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross = CrossAttention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # zero-initialised (adaLN-Zero)

    def forward(self, x, c, rope, text, key_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # (N, D) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + self.cross(self.norm2(x), text, key_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from D to one patch of C channels (zero-initialised)."""

    def __init__(self, width: int, patch_volume: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_volume * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------------------------- model
class DiT(nn.Module):
    """Spacetime DiT predicting the flow velocity of a video latent, conditioned on t, text and given frames."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.in_channels
        # input = noisy latent, clean latent of the given frames, per-frame mask -> 2C + 1 channels
        self.patch_embed = nn.Conv3d(2 * c + 1, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.place = PlaceEmbedding(cfg.abs_pos, cfg.width) if cfg.abs_pos else None
        self.t_embed = TimestepEmbedder(cfg.width)
        self.text = TextProjector(cfg.text_dim, cfg.width)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.width, math.prod(cfg.patch), c)
        self._rope_cache: dict = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, patch embed like a linear, zeroed adaLN and output layers (block = identity at init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_shape(self, t: int, h: int, w: int) -> None:
        """Raise ValueError unless a (T, H, W) latent can be patched."""
        pt, ph, pw = self.cfg.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent (T, H, W) = ({t}, {h}, {w}) must be multiples of the patch {self.cfg.patch}")

    def _rope(self, grid, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE cos/sin tables and the place features of a patch grid (cached for the last grid seen)."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_3d(grid, self.cfg.width // self.cfg.heads, self.cfg.rope_theta, device)
            place = self.place.features(grid, device) if self.place is not None else None
            self._rope_cache = {key: (cos, sin, place)}
        return self._rope_cache[key]

    def forward(self, x, t, text, text_mask, cond=None, frame_mask=None):
        """Velocity for noisy latent x.

        Args:
            x: (N, C, T, H, W) noisy latent x_t.
            t: (N,) flow time in [0, 1] (1 = pure noise).
            text: (N, L, text_dim) text-encoder token states; text_mask: (N, L) bool, False = padding/dropped.
            cond: (N, C, T, H, W) clean latent of the given frames (ignored where frame_mask is 0), or None.
            frame_mask: (N, T) 1 for given frames, 0 for frames to generate, or None (nothing given).
        Returns: (N, C, T, H, W) predicted velocity.
        """
        n, c, tt, hh, ww = x.shape
        self.check_shape(tt, hh, ww)
        if frame_mask is None:
            frame_mask = torch.zeros(n, tt, dtype=x.dtype, device=x.device)
        m = frame_mask.to(x.dtype)[:, None, :, None, None].expand(n, 1, tt, hh, ww)  # (N, 1, T, H, W)
        cond = torch.zeros_like(x) if cond is None else cond * m
        h = self.patch_embed(torch.cat([x, cond, m], dim=1))  # (N, D, T', H', W')
        grid = tuple(h.shape[2:])
        h = h.flatten(2).transpose(1, 2)  # (N, T'H'W', D)
        cos, sin, place = self._rope(grid, x.device)
        if place is not None:
            h = h + self.place(place).to(h.dtype)
        keys, key_mask, pooled = self.text(text.to(h.dtype), text_mask)
        cvec = self.t_embed(t) + pooled  # (N, D)
        rope = (cos, sin)
        for block in self.blocks:
            h = block(h, cvec, rope, keys, key_mask)
        out = self.final(h, cvec)  # (N, L, pt*ph*pw*C)
        pt, ph, pw = self.cfg.patch
        gt, gh, gw = grid
        out = out.view(n, gt, gh, gw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(n, c, tt, hh, ww)


# ---------------------------------------------------------------------------------------- flow objective
@dataclass
class FlowConfig:
    """Rectified-flow training schedule."""

    logit_mean: float = 0.0  # logit-normal location of t (SD3 uses 0)
    logit_std: float = 1.0  # logit-normal scale
    shift: float = 1.0  # t -> shift*t / (1 + (shift-1)*t); > 1 spends more steps near noise (larger videos)
    cond_prob: float = 0.3  # probability that a training sample gets a random frame-conditioning mask


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_time(n: int, flow: FlowConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t ~ shifted logit-normal(mean, std): (N,) in (0, 1)."""
    z = torch.randn(n, generator=generator) * flow.logit_std + flow.logit_mean
    return shift_time(torch.sigmoid(z), flow.shift).to(device)


def random_frame_masks(n: int, frames: int, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, T) training masks: with probability `prob` one of first frame, first+last, a prefix, a suffix."""
    masks = torch.zeros(n, frames)
    draw = torch.rand(n, generator=generator)
    kind = torch.randint(0, 4, (n,), generator=generator)
    length = torch.randint(1, max(2, frames // 2 + 1), (n,), generator=generator)
    for i in range(n):
        if draw[i] >= prob or frames < 2:
            continue
        k, ln = int(kind[i]), int(length[i])
        if k == 0:
            masks[i, 0] = 1  # image-to-video
        elif k == 1:
            masks[i, 0] = masks[i, -1] = 1  # infill between two frames
        elif k == 2:
            masks[i, :ln] = 1  # extend forward
        else:
            masks[i, frames - ln:] = 1  # extend backward
    return masks


def flow_loss(model: nn.Module, x0, text, text_mask, frame_mask, t, noise) -> torch.Tensor:
    """Mean squared error between predicted and true velocity over the frames not given (scalar)."""
    tb = t.to(x0.dtype)[:, None, None, None, None]
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t, text, text_mask, cond=x0, frame_mask=frame_mask)
    weight = (1 - frame_mask.to(x0.dtype))[:, None, :, None, None].expand_as(x0)  # (N, C, T, H, W)
    err = (v.float() - (noise - x0).float()) ** 2 * weight
    return err.sum() / weight.sum().clamp(min=1.0)


@torch.no_grad()
def sample_flow(model: nn.Module, noise, text, text_mask, null_mask, *, steps: int = 30, cfg: float = 4.0,
                shift: float = 1.0, cond=None, frame_mask=None) -> torch.Tensor:
    """Euler integration of the flow ODE from t=1 (noise) to t=0 with classifier-free guidance.

    `null_mask` is the text mask with every token dropped (the unconditional branch). Given frames (cond,
    frame_mask) are pasted into the result. Returns the (N, C, T, H, W) clean latent.
    """
    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    x = noise
    n = x.shape[0]
    for i in range(steps):
        t = torch.full((n,), ts[i], device=x.device)
        if cfg == 1.0:
            v = model(x, t, text, text_mask, cond=cond, frame_mask=frame_mask)
        else:
            fm = None if frame_mask is None else torch.cat([frame_mask, frame_mask])
            cc = None if cond is None else torch.cat([cond, cond])
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]),
                             torch.cat([text_mask, null_mask]), cond=cc, frame_mask=fm).float().chunk(2)
            v = v_u + cfg * (v_c - v_u)
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)
    if cond is not None and frame_mask is not None:
        m = frame_mask.to(x.dtype)[:, None, :, None, None]
        x = m * cond + (1 - m) * x
    return x
