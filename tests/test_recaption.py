"""Recaption without models: dominant colours and metadata captions of real decoded clips, the caption/expand stages,
template expansion, config validation, and `clipmill caption OUT` rewriting shards atomically without touching media."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from clipmill import synth
from clipmill.pipeline.cli import main as cli_main
from clipmill.pipeline.recipe import RecipeError, parse_recipe
from clipmill.recaption import expand_prompt
from clipmill.recaption.core import CaptionSettings, ExpandSettings, caption_clips
from clipmill.recaption.dataset import recaption_dataset
from clipmill.recaption.facts import METADATA_MODEL, dominant_colours
from clipmill.recaption.prompts import parse_expansion
from clipmill.stages.caption import FRAME_SET, Caption
from clipmill.stages.expand import Expand
from clipmill.stages.frames import Frames, FramesConfig, FrameSetConfig, decode_sets
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import ShardWriter, read_commits, read_table
from clipmill.storage.verify import verify_dataset


def two_colour_clip(path: Path, left: tuple[int, int, int], right: tuple[int, int, int], n: int = 24,
                    size: tuple[int, int] = (192, 108), seed: int = 0) -> bytes:
    """H.264 MP4 bytes of a clip whose left half is `left` and right half `right` (with noise and a moving bar)."""
    w, h = size
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        img = np.empty((h, w, 3), np.float32)
        img[:, : w // 2] = left
        img[:, w // 2:] = right
        img += rng.normal(0, 6, img.shape)
        x = (k * 5) % (w - 8)
        img[h // 3: h // 3 + 6, x:x + 8] = 128
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    synth.write_video(path, frames, fps=12)
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("rc_clips")
    return {"red_blue": two_colour_clip(d / "rb.mp4", (200, 30, 35), (40, 80, 200)),
            "green_white": two_colour_clip(d / "gw.mp4", (50, 150, 60), (235, 235, 235), seed=1),
            "source": two_colour_clip(d / "src.mp4", (235, 215, 50), (20, 20, 20), n=36, seed=2)}


def test_dominant_colours_of_decoded_clips(clips):
    sets, _ = decode_sets(clips["red_blue"], [FRAME_SET], 64)
    assert sets["caption"].shape[0] == 8 and max(sets["caption"].shape[1:3]) <= 448
    names = [n for n, _ in dominant_colours(list(sets["caption"]))]
    assert set(names[:2]) == {"red", "blue"}
    sets, _ = decode_sets(clips["green_white"], [FRAME_SET], 64)
    assert set(n for n, _ in dominant_colours(list(sets["caption"]))[:2]) == {"green", "white"}


def test_metadata_caption_states_the_measured_facts(clips):
    frames = list(decode_sets(clips["red_blue"], [FRAME_SET], 64)[0]["caption"])
    row = {"clip_duration_s": 4.2, "clip_width": 640, "clip_height": 360, "duration_s": 60.0,
           "camera_motion": "pan_left", "motion_score": 0.05, "ocr_text": "HELLO WORLD",
           "source_caption": "a red wall beside a blue door"}
    res = caption_clips([(row, frames)])[0]
    assert res.model == METADATA_MODEL and res.error is None
    cap = res.caption
    assert cap.startswith("A red wall beside a blue door.")
    for part in ("4.2-second 16:9", "pans left", "moderate motion", '"HELLO WORLD"', "red", "blue"):
        assert part in cap, (part, cap)
    assert "60.0" not in cap  # the video's duration is not the clip's
    bare = caption_clips([({"clip_duration_s": 2.0}, frames)])[0].caption
    assert bare.startswith("A video clip.") and "pans" not in bare


def _work_rows(clips: dict[str, bytes]) -> pa.Table:
    rows = []
    for i, (name, kept) in enumerate((("red_blue", True), ("green_white", False), ("red_blue", None))):
        rows.append({"uri": f"/v/{name}.mp4", "video_id": "v", "clip_index": i, "n_clips": 3, "media": clips[name],
                     "clip_duration_s": 2.0, "clip_width": 192, "clip_height": 108, "kept": kept,
                     "camera_motion": "static", "source_caption": None, "error": None})
    return pa.Table.from_pylist(rows)


def test_caption_and_expand_stages_caption_kept_clips_only(clips):
    frames = Frames(FramesConfig(extra_sets=(FrameSetConfig(name="caption", n=8, max_side=448),)))
    batch = frames(_work_rows(clips))
    assert "frames_caption" in batch.column_names
    out = Expand()(Caption()(batch))
    assert "frames_caption" not in out.column_names and "frames_caption_shape" not in out.column_names
    rows = out.to_pylist()
    assert [r["error"] for r in rows] == [None] * 3
    kept, rejected, unfiltered = rows
    assert rejected["caption"] is None and rejected["caption_model"] is None and rejected["prompt_long"] is None
    for r in (kept, unfiltered):
        assert r["caption_model"] == METADATA_MODEL and r["caption_error"] is None
        assert "the camera is static" in r["caption"].lower() and set(r["dominant_colors"][:2]) == {"red", "blue"}
        assert r["prompt_model"] == "clipmill/template" and r["prompt_long"] == r["caption"]
        assert r["prompt_short"] and len(r["prompt_short"].split()) <= 15 and "red" in r["prompt_short"]


def test_expand_prompt_template_matches_caption_structure():
    res = expand_prompt("  a cat   on a skateboard ")
    assert (res.short, res.model, res.error) == ("a cat on a skateboard", "clipmill/template", None)
    assert res.long.startswith("A cat on a skateboard.") and "4.0-second 16:9 shot" in res.long
    res = expand_prompt("waves", ExpandSettings(duration_s=8, aspect="9:16"))
    assert "8.0-second 9:16 shot" in res.long
    with pytest.raises(ValueError, match="empty"):
        expand_prompt("   ")


@pytest.mark.parametrize("reply", [
    "SHORT: a cat skating\nLONG: A grey cat rides a skateboard down a sunny street.",
    "short prompt: a cat skating long prompt: A grey cat rides a skateboard down a sunny street.",
    '{"short": "a cat skating", "long": "A grey cat rides a skateboard down a sunny street."}',
])
def test_parse_expansion_formats(reply):
    assert parse_expansion(reply) == ("a cat skating", "A grey cat rides a skateboard down a sunny street.")


@pytest.mark.parametrize("reply", ["", "A cat.", "SHORT: only the short one", "LONG: only the long one"])
def test_parse_expansion_rejects_malformed(reply):
    with pytest.raises(ValueError, match="malformed reply"):
        parse_expansion(reply)


@pytest.mark.parametrize("cfg, msg", [
    ({"backend": "transformers"}, "needs `model`"),
    ({"backend": "openai", "model": "m"}, "base_url"),
    ({"backend": "openai", "model": "m", "base_url": "http://x/v1", "api_key_env": "sk-abc123"}, "NAME"),
    ({"backend": "transformers", "model": "/nonexistent/model/dir"}, "does not exist"),
    ({"backend": "gpt"}, "backend"),
    ({"backend": "metadata", "temperture": 0.5}, "unknown key"),
])
def test_bad_caption_config_is_a_recipe_error(cfg, msg):
    data = {"name": "t", "stages": ["probe", "split", "transcode", "frames", {"caption": cfg}]}
    with pytest.raises(RecipeError, match=msg):
        parse_recipe(data)


def test_expand_needs_caption_before_it():
    with pytest.raises(RecipeError, match="caption"):
        parse_recipe({"name": "t", "stages": ["probe", "split", "transcode", "frames", "expand"]})


def test_cli_expand_prints_the_long_prompt():
    r = CliRunner().invoke(cli_main, ["expand", "a cat on a skateboard", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output.strip().splitlines()[-1])
    assert data["model"] == "clipmill/template" and data["long"].startswith("A cat on a skateboard.")
    r = CliRunner().invoke(cli_main, ["expand", ""])
    assert r.exit_code == 2 and "clipmill: error: cannot expand" in r.output


# ------------------------------------------------------------------------------------------------ datasets

def make_dataset(out: Path, clips: dict[str, bytes], src: Path) -> None:
    """A committed dataset of 2 shards: kept clips with media, a rejected one, a kept one without media (its
    source span is decoded instead) and one whose media is damaged."""
    src.write_bytes(clips["source"])

    def clip(vid: str, i: int, name: str | None, kept: bool, media: bytes | None = None) -> dict:
        m = clips[name] if name else media
        return {"clip_id": f"{vid}-{i}", "video_id": vid, "uri": str(src) if name is None else f"/x/{vid}.mp4",
                "clip_index": i, "start_frame": 6, "end_frame": 30, "start_s": 0.5, "end_s": 2.5, "duration_s": 2.0,
                "width": 192, "height": 108, "kept": kept, "reject_reasons": [] if kept else ["static"],
                "camera_motion": "pan_right", "media": m,
                "media_sha256": hashlib.sha256(m).hexdigest() if m else None, "caption": "old caption",
                "caption_model": "old/model"}

    with ShardWriter(out) as w:
        for vid, rows in (("va", [clip("va", 0, "red_blue", True), clip("va", 1, "green_white", False)]),
                          ("vb", [clip("vb", 0, None, True), clip("vb", 1, None, True, media=b"not an mp4")])):
            video = pa.Table.from_pylist([{"video_id": vid, "uri": rows[0]["uri"], "status": "done",
                                           "n_clips": len(rows)}], schema=VIDEOS_SCHEMA)
            w.commit(video, pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA))
    (out / "run.json").write_text(json.dumps({"schema_version": "1.2", "runs": []}))


def _by_id(out: Path) -> dict[str, dict]:
    return {r["clip_id"]: r for r in read_table(out, "clips").to_pylist()}


def test_recaption_dataset_rewrites_text_keeps_media_and_resumes(clips, tmp_path):
    out = tmp_path / "ds"
    make_dataset(out, clips, tmp_path / "source.mp4")
    before = _by_id(out)
    old_files = [out / r.files["clips"].path for r in read_commits(out)]
    seen = []
    rep = recaption_dataset(out, CaptionSettings(), ExpandSettings(), progress=lambda d, t: seen.append((d, t)))
    assert (rep.selected, rep.captioned, rep.caption_errors, rep.shards_rewritten) == (3, 2, 1, 2)
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    after = _by_id(out)
    for cid, r in after.items():
        assert r["media"] == before[cid]["media"] and r["media_sha256"] == before[cid]["media_sha256"]
    assert after["va-0"]["caption_model"] == METADATA_MODEL and "pans right" in after["va-0"]["caption"]
    assert set(after["va-0"]["dominant_colors"][:2]) == {"red", "blue"}
    assert after["va-0"]["prompt_model"] == "clipmill/template"
    assert after["va-1"]["caption"] == "old caption"  # rejected: untouched
    src = after["vb-0"]  # no media: decoded from the source span
    assert src["caption_error"] is None and set(src["dominant_colors"][:2]) == {"yellow", "black"}
    bad = after["vb-1"]
    assert bad["caption"] is None and bad["caption_error"].startswith("decode failed")
    assert all(not p.exists() for p in old_files)
    assert verify_dataset(out).ok
    assert json.loads((out / "run.json").read_text())["recaptions"][-1]["report"]["captioned"] == 2
    # Resume: nothing left for this model except the failed clip, which fails again.
    rep2 = recaption_dataset(out, CaptionSettings(), ExpandSettings())
    assert (rep2.skipped_done, rep2.captioned, rep2.caption_errors, rep2.shards_rewritten) == (2, 0, 1, 1)
    # --where narrows; --redo captions again what this model already did.
    rep3 = recaption_dataset(out, CaptionSettings(), None, where="clip_id = 'va-0'", redo=True)
    assert (rep3.selected, rep3.captioned, rep3.shards_rewritten) == (1, 1, 1)
    assert verify_dataset(out).ok


def test_cli_caption_errors_and_summary(clips, tmp_path):
    out = tmp_path / "ds"
    make_dataset(out, clips, tmp_path / "source.mp4")
    runner = CliRunner()
    r = runner.invoke(cli_main, ["caption", str(out), "--where", "no_such_column = 1"])
    assert r.exit_code == 2 and r.output.startswith("clipmill: error: bad --where") and "Traceback" not in r.output
    r = runner.invoke(cli_main, ["caption", str(tmp_path)])
    assert r.exit_code == 2 and "not a clipmill dataset" in r.output
    r = runner.invoke(cli_main, ["caption", str(out), "--recipe", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "bad recipe" in r.output
    r = runner.invoke(cli_main, ["caption", str(out), "--no-progress", "--where", "clip_id LIKE 'va-%'"])
    assert r.exit_code == 0, r.output
    assert "captioned 1 of 1 selected clips with clipmill/metadata" in r.output
    names = pq.read_schema(out / read_commits(out)[0].files["clips"].path).names
    assert {"caption_error", "dominant_colors", "prompt_error"} <= set(names)
