"""Aesthetics stage: LAION's improved aesthetic predictor (an MLP head on CLIP image embeddings) per clip.

One row per clip (level "clip"). Reads the "model" frame set (`frames_model`, `frames_model_shape`: 3
frames, longer side 384, decoded by the frames stage) and adds:

* `aesthetic_score`: the head's output averaged over the clip's frames. With the real head
  (`sac+logos+ava1-l14-linearMSE`, trained on OpenAI CLIP ViT-L/14 embeddings) it is on a 1-10 scale
  (LAION-Aesthetics V2 published its subsets at >= 5, >= 6 and >= 6.5). A random head (tests) gives
  arbitrary values.
* `embedding`: the mean of the frames' L2-normalised CLIP image embeddings, L2-normalised again
  (float32, the CLIP model's embedding size: 768 for ViT-L-14). Written because it is computed anyway;
  it replaces what the (weight-free) embedding stage wrote, if both run.
* `embedding_model`: which space `embedding` lives in, `open_clip:<architecture>:<clip_weights>` (a local
  weights file or folder by its name only), e.g. "open_clip:ViT-L-14:openai"; compare
  embeddings only between rows with the same value.

The stage loads its models once per instance (one per worker): an open_clip model with its own
inference preprocessing (resize, centre crop, mean/std) and the MLP head, whose input size follows the
CLIP model's embedding size (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between, as LAION trained
it; dropout is inactive at inference). Frames of all rows of a batch go through CLIP together
(`process_many`), at most `batch_size` x 3 images per forward pass. On CUDA it runs under bf16 autocast (fp16 where
bf16 is unsupported); on CPU in float32.

**The default recipe does not run this stage**: it needs about 1.7 GB of weights that cannot be
fetched offline. A user with internet fetches them once into the Hugging Face cache::

    python -c "import open_clip; open_clip.create_model('ViT-L-14', pretrained='openai')"
    hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth

(or downloads the head from https://github.com/christophschuhmann/improved-aesthetic-predictor and names
the file in `head_weights`), then adds after `- frames: {}` in a recipe::

    - aesthetics:
        clip_model: ViT-L-14
        clip_weights: openai
        head_weights: hf-hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth
        device: auto
        num_gpus: 1        # 0 runs on CPU (about 10 s per clip on 2 cores)
        batch_size: 16

Weights are only ever loaded as tensors (safetensors, or `torch.load(weights_only=True)`); no code from
a checkpoint or a hub repository is executed.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import unpack_frames

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AESTHETIC_SCORE = "aesthetic_score"
EMBEDDING = "embedding"
EMBEDDING_MODEL = "embedding_model"

#: 3 frames per clip; a 16:9 frame at 384 is 384x216, about CLIP's 224 input, so little is upscaled.
MODEL_FRAMES = FrameSpec("model", n=3, max_side=384)

HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
#: Hidden sizes of the LAION improved-aesthetic-predictor MLP, and the dropout after each hidden Linear.
HEAD_HIDDEN = (1024, 128, 64, 16)
HEAD_DROPOUT = (0.2, 0.2, 0.1, None)
HEAD_FETCH = (
    "hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth  "
    "(or: wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth)"
)


class AestheticsConfig(StageConfig):
    """Settings of the aesthetics stage.

    Args:
        clip_model: open_clip architecture name (see `open_clip.list_models()`), e.g. "ViT-L-14", or the
            path of an open_clip model config JSON (`{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}`),
            registered under the file's stem. Ignored for the architecture when `clip_weights` is an
            "hf-hub:" or "local-dir:" id (their own `open_clip_config.json` decides), but still used in
            `embedding_model`.
        clip_weights: the CLIP weights: an open_clip pretrained tag of `clip_model` (e.g. "openai",
            fetched into the Hugging Face cache on first use), a local checkpoint file (.safetensors
            preferred; .bin/.pt/.pth read with `weights_only=True`), a local folder holding
            `open_clip_config.json` plus weights, or "hf-hub:<org>/<repo>" of an open_clip model. The real
            aesthetic head was trained on OpenAI's ViT-L/14: other weights give meaningless scores.
        head_weights: the aesthetic MLP head: a local file (.safetensors preferred, or a torch state dict
            read with `weights_only=True`), or "hf-hub:<org>/<repo>/<file>". Keys are LAION's
            (`layers.0.weight` ... `layers.7.bias`) or the same without the `layers.` prefix.
        device: "auto" (CUDA when visible, else CPU), "cpu" or "cuda" ("cuda" needs `num_gpus` > 0: in a
            Ray run a stage without a GPU share does not see the GPU).
        num_gpus: GPUs per model replica in a run: 0 runs on CPU inside the per-video tasks (slow: about
            10 s per clip for ViT-L-14 on 2 cores), 1 gives each replica a GPU (0.5 fits two per GPU).
        actors: at most this many model replicas when `num_gpus` > 0 (default 1).
        batch_size: clips per batch; the frames of all of them go through CLIP together, in forward
            passes of at most `batch_size` x 3 images.
    """

    clip_model: str = Field("ViT-L-14", min_length=1)
    clip_weights: str = Field("openai", min_length=1)
    head_weights: str = Field(
        "hf-hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(0.0, ge=0.0, le=8.0)
    actors: int | None = Field(None, ge=1, le=1024)
    batch_size: int = Field(16, ge=1, le=1024)

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> AestheticsConfig:
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device='cuda' needs num_gpus > 0 (e.g. num_gpus: 1), or the stage's workers see no "
                             "GPU; allowed: device auto/cpu with num_gpus 0, or device auto/cuda with num_gpus > 0")
        return self


# ---------------------------------------------------------------------------------------------- loading


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a CUDA device is visible, else "cpu"; "cuda" without one is an error."""
    import torch  # noqa: PLC0415 - heavy import, lazy

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("aesthetics: device is 'cuda' but no CUDA device is visible to this process; set "
                           "device: auto or device: cpu in the recipe, or run where a GPU is (with num_gpus: 1)")
    return device


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.lower().endswith(_WEIGHT_SUFFIXES)


def resolve_arch(clip_model: str) -> str:
    """The open_clip architecture name for `clip_model`, registering a config JSON file if one is given."""
    import open_clip  # noqa: PLC0415 - heavy import, lazy

    if clip_model.lower().endswith(".json"):
        path = Path(clip_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"aesthetics: clip_model={clip_model!r}: model config JSON not found; give an "
                                    f"open_clip architecture name such as 'ViT-L-14' or an existing config file")
        open_clip.add_model_config(path)
        if path.stem not in open_clip.list_models():
            raise ValueError(f"aesthetics: clip_model={clip_model!r} is not an open_clip model config (it needs "
                             f"the keys embed_dim, vision_cfg and text_cfg)")
        return path.stem
    if clip_model.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)):
        raise ValueError(f"aesthetics: clip_model={clip_model!r}: put hub ids and local folders in clip_weights; "
                         f"clip_model is an architecture name such as 'ViT-L-14'")
    return clip_model


def clip_source(arch: str, clip_weights: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained) for `clip_weights`; raises naming the key when it cannot work."""
    import open_clip  # noqa: PLC0415

    if clip_weights.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return clip_weights, None
    path = Path(clip_weights).expanduser()
    if path.is_dir():
        return LOCAL_DIR_PREFIX + str(path), None
    if arch not in open_clip.list_models():
        raise ValueError(f"aesthetics: clip_model={arch!r} is not an open_clip architecture; use a name from "
                         f"open_clip.list_models() (e.g. 'ViT-L-14', 'ViT-B-32') or the path of a config JSON")
    if path.is_file():
        return arch, str(path)
    if _looks_like_path(clip_weights):
        raise FileNotFoundError(
            f"aesthetics: clip_weights={clip_weights!r}: no such file or folder. Put the {arch} checkpoint "
            f"there, or set clip_weights to an open_clip tag (for the LAION aesthetic head: clip_model: "
            f"ViT-L-14, clip_weights: openai) and fetch it once with: python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='openai')\"")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if clip_weights not in tags:
        raise ValueError(f"aesthetics: clip_weights={clip_weights!r} is neither a file, a folder, an hf-hub: id nor "
                         f"an open_clip tag of {arch}; tags of {arch}: {', '.join(tags) or '(none)'}")
    return arch, clip_weights


def load_clip(cfg: AestheticsConfig, device: str) -> tuple[Any, Any, str]:
    """Load the open_clip model named by the config; returns (model in eval mode, preprocess, arch)."""
    import open_clip  # noqa: PLC0415
    from open_clip.pretrained import get_pretrained_cfg  # noqa: PLC0415

    arch = resolve_arch(cfg.clip_model)
    name, pretrained = clip_source(arch, cfg.clip_weights)
    quick_gelu = False
    if pretrained is not None and not Path(pretrained).is_file():  # a tag: match the activation it was trained with
        model_cfg = open_clip.get_model_config(arch) or {}
        quick_gelu = bool(get_pretrained_cfg(arch, pretrained).get("quick_gelu")) and not model_cfg.get("quick_gelu")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu, weights_only=True,
            require_pretrained=True)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        fetch = (f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{pretrained}')\""
                 if pretrained and not Path(pretrained).is_file()
                 else f"hf download {name[len(HUB_PREFIX):]}" if name.startswith(HUB_PREFIX)
                 else "check that the file matches the architecture")
        raise RuntimeError(
            f"aesthetics: could not load CLIP (clip_model={cfg.clip_model!r}, clip_weights={cfg.clip_weights!r}): "
            f"{exc}. With internet, fetch the weights once with: {fetch}; offline, point clip_weights at a "
            f"local checkpoint file or folder") from exc
    model.eval()
    return model, preprocess, arch


def resolve_file(spec: str, key: str, fetch: str) -> Path:
    """A local file for a path or an "hf-hub:<org>/<repo>/<file>" spec (from the cache, or downloaded)."""
    if spec.startswith(HUB_PREFIX):
        parts = spec[len(HUB_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise ValueError(f"aesthetics: {key}={spec!r}: a hub file is written hf-hub:<org>/<repo>/<file>")
        from huggingface_hub import hf_hub_download  # noqa: PLC0415
        from huggingface_hub.errors import EntryNotFoundError  # noqa: PLC0415

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except (OSError, EntryNotFoundError, ValueError) as exc:
            raise FileNotFoundError(
                f"aesthetics: {key}={spec!r} could not be fetched ({type(exc).__name__}: {exc}). With internet "
                f"run once: {fetch}; offline, download the file elsewhere and set {key} to its local path") from exc
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"aesthetics: {key}={spec!r}: no such file. Put the file there or set {key} to "
                                f"another path or an hf-hub:<org>/<repo>/<file> id; to fetch it: {fetch}")
    return path


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch state dict (`weights_only=True`), prefixes stripped."""
    import torch  # noqa: PLC0415

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"aesthetics: {key}={str(path)!r} is not a tensor-only torch state dict ({exc}); "
                             f"convert it to .safetensors") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"aesthetics: {key}={str(path)!r} does not hold a state dict of tensors")
    out = {}
    for name, tensor in state.items():
        for prefix in ("module.", "layers."):
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def build_head(in_dim: int) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP for `in_dim`-d embeddings (Linear indices 0, 2, 4, 6, 7)."""
    from torch import nn  # noqa: PLC0415

    layers: list[nn.Module] = []
    width = in_dim
    for hidden, drop in zip(HEAD_HIDDEN, HEAD_DROPOUT, strict=True):
        layers.append(nn.Linear(width, hidden))
        if drop is not None:
            layers.append(nn.Dropout(drop))
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def load_head(spec: str, path: Path, in_dim: int) -> torch.nn.Sequential:
    """The aesthetic head (`head_weights` = spec, resolved to `path`), checked against the CLIP size, in eval mode."""
    state = read_state_dict(path, "head_weights")
    first = state.get("0.weight")
    if first is None or first.ndim != 2:
        raise ValueError(f"aesthetics: head_weights={spec!r} is not a LAION aesthetic head (no 'layers.0.weight'; "
                         f"keys: {sorted(state)[:8]})")
    if first.shape[1] != in_dim:
        raise ValueError(f"aesthetics: head_weights={spec!r} takes {first.shape[1]}-d embeddings but the CLIP model "
                         f"gives {in_dim}-d ones; the LAION head needs clip_model: ViT-L-14, clip_weights: openai")
    head = build_head(in_dim)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"aesthetics: head_weights={spec!r} does not fit the LAION head architecture "
                         f"({in_dim}->1024->128->64->16->1): {exc}") from exc
    return head.eval()


def weights_label(clip_weights: str) -> str:
    """The weights part of `embedding_model`: a tag or hub id as given, a local file or folder by its name."""
    if clip_weights.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)) or not _looks_like_path(clip_weights):
        return clip_weights
    return Path(clip_weights).name


# ---------------------------------------------------------------------------------------------- stage


class Aesthetics(RowStage):
    """LAION aesthetic score and CLIP image embedding per clip, from 3 frames, batched over rows.

    Loads CLIP and the head once in `__init__` and raises there (naming the recipe key and the fetch
    command) when weights are missing or do not fit each other.
    """

    name: ClassVar[str] = "aesthetics"
    Config: ClassVar[type[StageConfig]] = AestheticsConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = MODEL_FRAMES.columns
    adds: ClassVar[dict[str, pa.DataType]] = {
        AESTHETIC_SCORE: pa.float32(),
        EMBEDDING: pa.list_(pa.float32()),
        EMBEDDING_MODEL: pa.string(),
    }
    uses_model: ClassVar[bool] = True
    batch_size: ClassVar[int] = 16
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = (MODEL_FRAMES,)

    def __init__(self, cfg: StageConfig | None = None) -> None:
        super().__init__(cfg)
        import torch  # noqa: PLC0415

        cfg_: AestheticsConfig = self.cfg  # type: ignore[assignment]
        self.device = resolve_device(cfg_.device)
        head_path = resolve_file(cfg_.head_weights, "head_weights", HEAD_FETCH)  # small: fail fast before CLIP
        model, self.preprocess, arch = load_clip(cfg_, self.device)
        self.visual = model.visual  # the text tower is not needed; dropping `model` frees it
        del model
        size = self.preprocess_size()
        with torch.inference_mode():
            probe = self._features(torch.zeros(1, 3, *size, device=self.device))
        self.dim = int(probe.shape[-1])
        self.head = load_head(cfg_.head_weights, head_path, self.dim).to(self.device)
        self.model_label = f"open_clip:{arch}:{weights_label(cfg_.clip_weights)}"
        log.info("aesthetics: loaded %s (%d-d embeddings) on %s", self.model_label, self.dim, self.device)

    def preprocess_size(self) -> tuple[int, int]:
        """(height, width) of the images the CLIP vision tower takes."""
        size = getattr(self.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def _autocast(self) -> Any:
        import torch  # noqa: PLC0415

        if self.device != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 CLIP image embeddings of preprocessed images (n, 3, H, W) -> (n, D)."""
        import torch  # noqa: PLC0415

        with self._autocast():
            out = self.visual(images)
        if isinstance(out, tuple):  # towers that also return tokens (CoCa)
            out = out[0]
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def embed_frames(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised embeddings (n, D), head scores (n,)) of n RGB uint8 frames (h, w, 3), any sizes."""
        import torch  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415

        cfg: AestheticsConfig = self.cfg  # type: ignore[assignment]
        feats, scores = [], []
        with torch.inference_mode():
            step = cfg.batch_size * (MODEL_FRAMES.n or 1)
            for start in range(0, len(frames), step):
                chunk = frames[start:start + step]
                x = torch.stack([self.preprocess(Image.fromarray(f)) for f in chunk]).to(self.device)
                emb = self._features(x)  # (b, D)
                feats.append(emb.cpu())
                scores.append(self.head(emb).squeeze(-1).float().cpu())  # head in float32
        return torch.cat(feats).numpy(), torch.cat(scores).numpy()

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        blob_col, shape_col = MODEL_FRAMES.columns
        stacks = []
        for row in rows:
            blob, shape = row.get(blob_col), row.get(shape_col)
            if blob is None or shape is None:
                raise ValueError(f"row has no {blob_col} (run the frames stage with the 'model' frame set first)")
            stacks.append(unpack_frames(blob, shape))
        emb, scores = self.embed_frames([f for frames in stacks for f in frames])
        out, at = [], 0
        for row, frames in zip(rows, stacks, strict=True):
            n = len(frames)
            mean = emb[at:at + n].mean(axis=0)
            mean /= max(float(np.linalg.norm(mean)), 1e-12)
            score = float(scores[at:at + n].mean())
            if not np.isfinite(score) or not np.all(np.isfinite(mean)):
                raise ValueError(f"aesthetics: non-finite output for {row.get('uri')}")
            out.append(dict(row, **{AESTHETIC_SCORE: score, EMBEDDING: mean.astype(np.float32).tolist(),
                                    EMBEDDING_MODEL: self.model_label}))
            at += n
        return out
