"""Recaption with real model code: tiny random Qwen2-VL and Qwen2 models built from configs and loaded through
`from_pretrained` (the path real weights take), served over a local OpenAI-compatible server for the HTTP backend
(with timeouts, 500s and garbage injected), and vLLM on a GPU when one is present."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from clipmill import synth
from clipmill.recaption.backends import clear_backends, make_backend
from clipmill.recaption.core import (
    CaptionSettings,
    ExpandSettings,
    caption_clips,
    expand_clips,
    expand_prompt,
)
from clipmill.recaption.dataset import recaption_dataset
from clipmill.recaption.hf import TransformersBackend
from clipmill.recaption.openai_http import OpenAIBackend
from clipmill.recaption.server import ChatHandler, ChatServer
from clipmill.recaption.textgen import GenRequest
from clipmill.recaption.tiny import build_tiny_llm, build_tiny_vlm
from clipmill.recaption.vllm_backend import VllmBackend, vllm_available
from clipmill.stages.caption import FRAME_SET
from clipmill.stages.frames import decode_sets
from clipmill.storage.shards import read_table


def _dataset_helpers():
    """make_dataset and two_colour_clip of tests/test_recaption.py (pytest's importlib mode has no sibling imports)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("_recaption_tests", Path(__file__).with_name("test_recaption.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_dataset, mod.two_colour_clip


KEY = "sk-test-4f1c9e0b7a3d-never-store-me"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tiny_models")
    vlm, llm = build_tiny_vlm(d / "vlm"), build_tiny_llm(d / "llm")
    yield {"vlm": str(vlm), "llm": str(llm)}
    clear_backends()


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[list[np.ndarray]]:
    """Decoded caption frames of three real clips (generated textured shots, H.264-encoded, decoded by the frames
    code)."""
    d = tmp_path_factory.mktemp("rc_video")
    out = []
    for i, motion in enumerate(("pan", "static", "zoom")):
        frames, _ = synth.render_shots([synth.Shot(12, motion=motion)], 160, 96, seed=i)
        synth.write_video(d / f"{motion}.mp4", list(frames()), fps=12)
        sets, _ = decode_sets((d / f"{motion}.mp4").read_bytes(), [FRAME_SET], 32)
        out.append(list(sets["caption"]))
    return out


def _rows(frames):
    return [({"clip_duration_s": 2.0 + i, "clip_width": 160, "clip_height": 96, "camera_motion": "pan_left"}, f)
            for i, f in enumerate(frames)]


@pytest.mark.slow
def test_transformers_vlm_captions_batched_equal_one_by_one(tiny, frames):
    cfg = CaptionSettings(backend="transformers", model=tiny["vlm"], max_new_tokens=8, batch_size=3, max_frames=3,
                          image_side=112)
    batched = caption_clips(_rows(frames), cfg)
    assert all(r.error is None and r.caption and r.model == tiny["vlm"] for r in batched)
    assert all(r.tokens > 0 for r in batched)
    alone = [caption_clips([row], cfg)[0] for row in _rows(frames)]
    assert [r.caption for r in batched] == [r.caption for r in alone]
    # The backend really looks at the frames: other pixels, other greedy output.
    flipped = caption_clips([(r, [255 - f for f in fr]) for r, fr in _rows(frames)], cfg)
    assert [r.caption for r in flipped] != [r.caption for r in batched]


@pytest.mark.slow
def test_transformers_llm_expansion_records_malformed_replies(tiny):
    cfg = ExpandSettings(backend="transformers", model=tiny["llm"], max_new_tokens=12, batch_size=2)
    rows = [{"caption": "A grey cat rides a skateboard."}, {"caption": None}, {"caption": "Waves at dusk."}]
    res = expand_clips(rows, cfg)
    assert res[1] is None
    for r in (res[0], res[2]):  # a random model does not write SHORT:/LONG: lines
        assert r.model == tiny["llm"] and r.short is None and r.error.startswith("malformed reply")
    be = make_backend(cfg, vision=False)
    reqs = [GenRequest("a cat", system="be brief"), GenRequest("a much longer prompt about the sea at night")]
    assert [r.text for r in be.generate(reqs)] == [be.generate([q])[0].text for q in reqs]
    out = expand_prompt("a cat on a skateboard", cfg)  # the sampler always gets a prompt
    assert out.model == "clipmill/template" and out.long.startswith("A cat on a skateboard.")
    assert out.error.startswith(tiny["llm"]) and "malformed reply" in out.error


def test_context_overflow_is_an_error_not_a_crash(tiny):
    be = TransformersBackend(tiny["llm"], vision=False, max_new_tokens=4, batch_size=2)
    huge = GenRequest("word " * 5000)  # past max_position_embeddings = 4096
    res = be.generate([GenRequest("a cat"), huge])
    assert res[0].error is None and res[0].text
    assert res[1].text is None and res[1].error.startswith("context overflow: prompt of ")


def test_a_model_that_cannot_load_is_recorded_per_clip_and_refused_by_the_cli(tmp_path, frames):
    from click.testing import CliRunner  # noqa: PLC0415

    from clipmill.pipeline.cli import main as cli_main  # noqa: PLC0415
    from clipmill.stages.caption import Caption, CaptionConfig  # noqa: PLC0415
    from clipmill.stages.expand import Expand, ExpandConfig  # noqa: PLC0415

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    blob = np.stack(frames[0])
    rows = [{"uri": "/v.mp4", "clip_index": 0, "kept": True, "frames_caption": blob.tobytes(),
             "frames_caption_shape": list(blob.shape), "clip_duration_s": 1.0, "error": None}]
    import pyarrow as pa  # noqa: PLC0415

    out = Caption(CaptionConfig(backend="transformers", model=str(empty)))(pa.Table.from_pylist(rows))
    row = out.to_pylist()[0]
    assert row["error"] is None and row["caption"] is None
    assert row["caption_error"].startswith("backend unavailable: transformers backend for")
    row2 = Expand(ExpandConfig(backend="transformers", model=str(empty)))(
        pa.Table.from_pylist([dict(row, caption="A cat.")])).to_pylist()[0]
    assert row2["error"] is None and row2["prompt_error"].startswith("backend unavailable")
    rp = tmp_path / "r.yaml"
    rp.write_text(json.dumps({"name": "r", "stages": ["probe", "split", "transcode", "frames", {"caption": {
        "backend": "transformers", "model": str(empty)}}, {"expand": {"backend": "transformers", "model": str(empty)}}]}))
    r = CliRunner().invoke(cli_main, ["expand", "a cat", "--recipe", str(rp)])
    assert r.exit_code == 2 and r.output.startswith("clipmill: error: cannot expand: transformers backend")


class FaultyHandler(ChatHandler):
    """Injects the next fault of `server.app.faults` ("timeout", "500", "garbage", "context") before replying."""

    def do_POST(self) -> None:  # noqa: N802
        app = self.server.app
        fault = app.faults.pop(0) if app.faults else None
        app.seen.append(fault)
        if fault is None:
            return super().do_POST()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if fault == "timeout":
            time.sleep(1.0)
            return self.send_json(200, {"choices": [{"message": {"content": "too late"}}]})
        if fault == "500":
            return self.send_json(500, {"error": {"message": "internal error"}})
        if fault == "context":
            return self.send_json(400, {"error": {"message": "This model's maximum context length is 32 tokens"}})
        body = b"<html>502 bad gateway</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(tiny):
    be = TransformersBackend(tiny["vlm"], vision=True, max_new_tokens=8, image_side=112)
    srv = ChatServer(be, model="tiny-qwen2-vl", api_key=KEY, handler=FaultyHandler)
    srv.faults, srv.seen = [], []
    with srv:
        yield srv


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("CLIPMILL_TEST_KEY", KEY)
    return "CLIPMILL_TEST_KEY"


def _http(server, key_env, **kw) -> CaptionSettings:
    return CaptionSettings(backend="openai", model="tiny-qwen2-vl", base_url=server.url, api_key_env=key_env,
                           max_new_tokens=8, max_frames=2, **{"timeout_s": 60.0, "retries": 2, "backoff_s": 0.01, **kw})


def test_http_backend_captions_through_the_served_model(server, key_env, frames):
    server.faults[:] = []
    res = caption_clips(_rows(frames), _http(server, key_env, concurrency=3))
    assert all(r.error is None and r.caption and r.model == "tiny-qwen2-vl" and r.tokens > 0 for r in res)
    with pytest.raises(ValueError, match="CLIPMILL_MISSING_KEY"):
        OpenAIBackend(server.url, "m", api_key_env="CLIPMILL_MISSING_KEY")
    wrong = OpenAIBackend(server.url, "m", retries=0).generate([GenRequest("hi")])[0]
    assert wrong.error.startswith("http 401")


@pytest.mark.parametrize("faults, ok, error, calls", [
    (["500", "garbage"], True, None, 3),  # retried until it worked
    (["timeout", "timeout", "timeout"], False, "timeout after 0.3 s (after 3 attempts)", 3),
    (["500", "500", "500"], False, "http 500", 3),
    (["garbage", "garbage", "garbage"], False, "malformed reply: not JSON", 3),
    (["context"], False, "context overflow: http 400", 1),  # not retried
])
def test_http_retries_and_caption_error(server, key_env, frames, faults, ok, error, calls):
    server.faults[:], server.seen[:] = list(faults), []
    timeout = {"timeout_s": 0.3} if "timeout" in faults else {}  # the fault sleeps 1 s
    res = caption_clips(_rows(frames[:1]), _http(server, key_env, concurrency=1, **timeout))[0]
    assert len(server.seen) == calls
    if ok:
        assert res.error is None and res.caption
    else:
        assert res.caption is None and res.error.startswith(error.split(" (")[0]) and (error in res.error)
    server.faults[:] = []


def test_failed_captions_are_retried_with_where_and_the_key_is_never_stored(server, key_env, tmp_path, caplog):
    make_dataset, two_colour_clip = _dataset_helpers()

    caplog.set_level(logging.DEBUG)
    clips = {"red_blue": two_colour_clip(tmp_path / "a.mp4", (200, 30, 35), (40, 80, 200)),
             "green_white": two_colour_clip(tmp_path / "b.mp4", (50, 150, 60), (235, 235, 235)),
             "source": two_colour_clip(tmp_path / "c.mp4", (235, 215, 50), (20, 20, 20), n=36)}
    out = tmp_path / "ds"
    make_dataset(out, clips, tmp_path / "source.mp4")
    cfg = _http(server, key_env, retries=0)
    server.faults[:] = ["500"] * 3
    rep = recaption_dataset(out, cfg, None)
    assert rep.caption_errors == 3 and rep.errors == {"http 500": 2, "decode failed": 1}
    rows = {r["clip_id"]: r for r in read_table(out, "clips").to_pylist()}
    assert rows["va-0"]["caption"] is None and rows["va-0"]["caption_error"].startswith("http 500")
    assert rows["va-0"]["caption_model"] == "tiny-qwen2-vl"
    server.faults[:] = []
    rep = recaption_dataset(out, cfg, None, where="caption IS NULL")
    assert rep.selected == 3 and rep.captioned == 2 and rep.errors == {"decode failed": 1}
    rows = {r["clip_id"]: r for r in read_table(out, "clips").to_pylist()}
    assert rows["va-0"]["caption"] and rows["va-0"]["caption_error"] is None
    for p in Path(out).rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in caplog.text
    assert json.loads((out / "run.json").read_text())["recaptions"][-1]["caption"]["api_key_env"] == key_env


def test_vllm_backend_on_gpu(tiny, frames):
    ok, why = vllm_available()
    if not ok:
        pytest.skip(f"vLLM backend needs vLLM and a CUDA GPU: {why}")
    be = VllmBackend(tiny["vlm"], max_images=2, max_new_tokens=8, gpu_memory_utilization=0.3, max_model_len=2048)
    res = be.generate([GenRequest("Describe.", images=f[:2]) for f in frames])
    assert all(r.error is None and r.text for r in res)


@pytest.mark.slow
def test_pipeline_run_with_transformers_caption_then_recaption_cli(tiny, tmp_path, ray_session, clipmill_env):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    src = tmp_path / "in"
    src.mkdir()
    synth.make_case("cuts", src / "cuts.mp4", width=160, height=96)
    recipe = {"name": "rc", "stages": [
        "probe", {"split": {"min_s": 1.0, "max_s": 3.0}}, {"transcode": {"max_side": 160}}, {"frames": {"n": 4}},
        "quality", "motion", {"filter": {"reject_static": False, "min_contrast": None}},
        {"caption": {"backend": "transformers", "model": tiny["vlm"], "max_new_tokens": 6, "max_frames": 2,
                     "image_side": 112, "batch_size": 4}},
        {"expand": {"backend": "template"}}],
        "write": {"shard_videos": 1}, "runtime": {"num_cpus": 2}}
    rp = tmp_path / "rc.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "clipmill"]
    env = dict(clipmill_env, RAY_ADDRESS=ray_session)
    r = subprocess.run(cli + ["run", str(src), "-o", str(out), "--recipe", str(rp)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    clips = read_table(out, "clips").to_pylist()
    kept = [c for c in clips if c["kept"]]
    assert kept and all(c["caption"] and c["caption_model"] == tiny["vlm"] and c["caption_error"] is None
                        and c["prompt_model"] == "clipmill/template" for c in kept)
    assert all(c["caption"] is None for c in clips if not c["kept"])
    media = {c["clip_id"]: c["media"] for c in clips}
    r = subprocess.run(cli + ["caption", str(out), "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"captioned {len(kept)} of {len(kept)} selected clips with clipmill/metadata" in r.stdout
    after = read_table(out, "clips").to_pylist()
    assert all(c["media"] == media[c["clip_id"]] for c in after)
    assert all(c["caption_model"] == "clipmill/metadata" for c in after if c["kept"])
    assert os.path.exists(out / "run.json")
