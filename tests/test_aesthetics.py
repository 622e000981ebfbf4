"""Aesthetics stage with a tiny random open_clip ViT and a random LAION-shaped head, saved to files and
loaded through the same code path as real weights (config names the architecture and local weight files),
on frames decoded from real video. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill import synth
from clipmill.stages.aesthetics import MODEL_FRAMES, Aesthetics, AestheticsConfig, build_head
from clipmill.stages.frames import Frames, FramesConfig, FrameSetConfig

torch = pytest.importorskip("torch", reason="the aesthetics stage needs torch (pip install 'clipmill[torch]')")
open_clip = pytest.importorskip("open_clip", reason="the aesthetics stage needs open-clip-torch")
from safetensors.torch import save_file  # noqa: E402

ARCH = "clipmill-tiny-vit"
EMBED_DIM = 32
TINY_CONFIG = {  # a real open_clip ViT-CLIP architecture, just very small
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Config JSON, CLIP weights (.safetensors) and the head (.safetensors and .pth) of a tiny random model."""
    d = tmp_path_factory.mktemp("aesthetics_weights")
    config = d / f"{ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    clip = d / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip))
    head_state = {f"layers.{k}": v for k, v in build_head(EMBED_DIM).state_dict().items()}  # LAION's key names
    head = d / "tiny_head.safetensors"
    save_file(head_state, str(head))
    head_pth = d / "tiny_head.pth"
    torch.save(head_state, head_pth)
    return {"config": config, "clip": clip, "head": head, "head_pth": head_pth}


def tiny_config(weights: dict[str, Path], **over) -> AestheticsConfig:
    """The stage config a user would write, pointing at the tiny model's files."""
    fields = {"clip_model": str(weights["config"]), "clip_weights": str(weights["clip"]),
              "head_weights": str(weights["head"]), "device": "cpu", "batch_size": 1}
    return AestheticsConfig(**(fields | over))


@pytest.fixture(scope="module")
def frames_table(tmp_path_factory) -> pa.Table:
    """Three clips of different scenes and sizes, decoded by the frames stage with the stage's frame set."""
    d = tmp_path_factory.mktemp("aesthetics_inputs")
    paths = []
    for seed, (w, h) in enumerate([(320, 180), (240, 240), (200, 112)], start=1):
        paths.append(d / f"scene{seed}.mp4")
        synth.make_shots_video(paths[-1], [synth.Shot(24, "pan")], width=w, height=h, seed=seed)
    table = pa.table({"uri": [str(p) for p in paths], "clip_index": [0] * len(paths),
                      "media": [p.read_bytes() for p in paths]})
    spec = FrameSetConfig(name=MODEL_FRAMES.name, n=MODEL_FRAMES.n, max_side=MODEL_FRAMES.max_side)
    return Frames(FramesConfig(n=2, extra_sets=(spec,)))(table)


@pytest.fixture(scope="module")
def stage(weights) -> Aesthetics:
    return Aesthetics(tiny_config(weights))


def test_scores_embeddings_and_reference(stage, frames_table, weights):
    rows = stage(frames_table).to_pylist()
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(weights["clip"]))
    head = build_head(EMBED_DIM)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in torch.load(weights["head_pth"], weights_only=True).items()})
    model.eval(), head.eval()
    from PIL import Image

    for row in rows:
        assert row["error"] is None, row["error"]
        emb = np.asarray(row["embedding"])
        assert emb.shape == (EMBED_DIM,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
        assert np.isfinite(row["aesthetic_score"])
        assert row["embedding_model"] == f"open_clip:{ARCH}:tiny_clip.safetensors"
        # reference: open_clip directly, head on each frame's normalised embedding, mean over frames
        n, h, w, _ = row["frames_model_shape"]
        frames = np.frombuffer(row["frames_model"], np.uint8).reshape(n, h, w, 3)
        assert n == MODEL_FRAMES.n and max(h, w) <= MODEL_FRAMES.max_side
        with torch.no_grad():
            x = torch.stack([preprocess(Image.fromarray(f)) for f in frames])
            feats = model.encode_image(x, normalize=True)
            ref_score = float(head(feats).mean())
            ref_emb = torch.nn.functional.normalize(feats.mean(0), dim=0).numpy()
        assert row["aesthetic_score"] == pytest.approx(ref_score, rel=1e-4, abs=1e-5)
        assert np.allclose(emb, ref_emb, atol=1e-5)
    embs = np.array([r["embedding"] for r in rows])
    assert not np.allclose(embs[0], embs[1])  # different scenes, different embeddings
    assert output_type_ok(stage(frames_table).schema)


def output_type_ok(schema: pa.Schema) -> bool:
    return (schema.field("aesthetic_score").type == pa.float32()
            and schema.field("embedding").type == pa.list_(pa.float32())
            and schema.field("embedding_model").type == pa.string())


def test_batched_equals_row_by_row_and_model_loaded_once(weights, frames_table, monkeypatch):
    calls = []
    real = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    st = Aesthetics(tiny_config(weights))
    batched_calls = []
    real_many = st.process_many
    monkeypatch.setattr(st, "process_many", lambda rows: batched_calls.append(len(rows)) or real_many(rows))
    batched = st(frames_table).to_pylist()
    assert batched_calls == [3]  # all three live rows went through one process_many
    single = [st.process(r) for r in frames_table.to_pylist()]
    again = st(frames_table.slice(0, 1)).to_pylist()
    assert len(calls) == 1  # one model load per stage instance, however many batches
    for b, s in zip(batched, single, strict=True):
        assert b["aesthetic_score"] == pytest.approx(s["aesthetic_score"], rel=1e-4, abs=1e-5)
        assert np.allclose(b["embedding"], s["embedding"], atol=1e-5)
    assert again[0]["aesthetic_score"] == pytest.approx(batched[0]["aesthetic_score"], rel=1e-4, abs=1e-5)


def test_torch_state_dict_head_matches_safetensors(weights, frames_table, stage):
    other = Aesthetics(tiny_config(weights, head_weights=str(weights["head_pth"]), batch_size=8))
    a, b = stage(frames_table).to_pylist(), other(frames_table).to_pylist()
    for x, y in zip(a, b, strict=True):
        assert x["aesthetic_score"] == pytest.approx(y["aesthetic_score"], rel=1e-4, abs=1e-5)


def test_missing_or_wrong_weights_fail_at_construction(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_weights") as err:
        Aesthetics(tiny_config(weights, clip_weights=str(tmp_path / "missing.safetensors")))
    assert "open_clip.create_model" in str(err.value)  # says how to fetch
    with pytest.raises(FileNotFoundError, match="head_weights") as err:
        Aesthetics(tiny_config(weights, head_weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")))
    assert "hf download camenduru/improved-aesthetic-predictor" in str(err.value)
    with pytest.raises(FileNotFoundError, match="clip_model"):
        Aesthetics(tiny_config(weights, clip_model=str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match="clip_weights='no-such-tag'"):
        Aesthetics(tiny_config(weights, clip_weights="no-such-tag"))
    wrong = tmp_path / "head48.safetensors"
    save_file({f"layers.{k}": v for k, v in build_head(48).state_dict().items()}, str(wrong))
    with pytest.raises(ValueError, match="head_weights.*48-d"):
        Aesthetics(tiny_config(weights, head_weights=str(wrong)))
    with pytest.raises(ValueError, match="hf-hub:<org>/<repo>/<file>"):
        Aesthetics(tiny_config(weights, head_weights="hf-hub:just-a-repo"))


def test_hub_head_offline_is_a_clear_error(weights, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="head_weights") as err:
        Aesthetics(tiny_config(weights, head_weights="hf-hub:example-org/no-such-repo/head.safetensors"))
    assert "hf download" in str(err.value)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        AestheticsConfig(devise="cpu")
    with pytest.raises(ValidationError):
        AestheticsConfig(device="tpu")
    with pytest.raises(ValidationError):
        AestheticsConfig(batch_size=0)
    with pytest.raises(ValidationError, match="num_gpus"):
        AestheticsConfig(device="cuda")
    assert AestheticsConfig(device="cuda", num_gpus=0.5).num_gpus == 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(weights):
    with pytest.raises(RuntimeError, match="device: auto"):
        Aesthetics(tiny_config(weights, device="cuda", num_gpus=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16/fp16 autocast path)")
def test_cuda_autocast_close_to_cpu(weights, frames_table, stage):
    gpu = Aesthetics(tiny_config(weights, device="cuda", num_gpus=1))
    assert gpu.device == "cuda"
    for c, g in zip(stage(frames_table).to_pylist(), gpu(frames_table).to_pylist(), strict=True):
        assert g["error"] is None, g["error"]
        assert np.linalg.norm(g["embedding"]) == pytest.approx(1.0, abs=1e-3)
        assert float(np.dot(c["embedding"], g["embedding"])) > 0.98
        assert g["aesthetic_score"] == pytest.approx(c["aesthetic_score"], abs=0.05)
