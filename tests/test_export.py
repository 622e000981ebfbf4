"""`clipmill export`: WebDataset, MP4 + JSONL and Hugging Face Parquet exports of a real run, read back by
the libraries trainers use (webdataset, datasets) and decoded with PyAV."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import av
import pytest
from click.testing import CliRunner

from clipmill.pipeline.cli import main
from clipmill.storage.export import (
    ExportError,
    bucket_name,
    clip_text,
    export_dataset,
    resolution_class,
)
from clipmill.storage.select import SelectError

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def dataset(captioned_dataset):
    """The session's captioned dataset (16:9, 9:16, a static 1:1 whose clips are rejected and keep no media)."""
    clips = captioned_dataset["clips"]
    assert any(r["media"] is None for r in clips.values()) and any(r["media"] for r in clips.values())
    return captioned_dataset


def _decode(data: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of MP4 bytes, decoded with PyAV."""
    n, size = 0, (0, 0)
    with av.open(io.BytesIO(data)) as c:
        for frame in c.decode(video=0):
            n += 1
            size = (frame.width, frame.height)
    return n, size[0], size[1]


def _check_media(row: dict, data: bytes) -> None:
    n, w, h = _decode(data)
    assert (n, w, h) == (row["n_frames"], row["width"], row["height"]), row["clip_id"]


def _no_partials(dest: Path) -> None:
    assert not [p for p in dest.parent.iterdir() if ".partial-" in p.name]
    assert not list(dest.rglob(".*.tmp"))


def test_bucket_rules():
    assert resolution_class(1920, 1080) == "1080p" and resolution_class(1080, 1920) == "1080p"
    assert resolution_class(1280, 719) == "480p" and resolution_class(256, 144) == "144p"
    assert resolution_class(160, 90) == "lt144p" and resolution_class(0, 10) == "unknown"
    assert bucket_name(1280, 720) == "720p_16x9" and bucket_name(144, 256) == "144p_9x16"
    assert bucket_name(240, 240) == "240p_1x1" and bucket_name(3840, 1600) == "1440p_21x9"


def test_text_choice():
    row = {"caption": " ", "prompt_long": "long prompt", "prompt_short": "short", "source_caption": "src"}
    assert clip_text(row, "auto") == "long prompt"
    assert clip_text(row, "prompt_short") == "short"
    assert clip_text(row, "caption") == ""
    assert clip_text({"source_caption": "src"}, "auto") == "src"


def test_webdataset_round_trip(dataset, tmp_path):
    import webdataset as wds

    clips = dataset["clips"]
    dest = tmp_path / "wds"
    report = export_dataset(dataset["out"], "webdataset", dest, where="true", shard_mb=0.05)
    with_media = {c for c, r in clips.items() if r["media"] is not None}
    assert report.exported == len(with_media) and report.skipped_no_media == len(clips) - len(with_media) > 0
    index = json.loads((dest / "index.json").read_text())
    assert index["where"] == "true" and index["counts"]["exported"] == len(with_media)
    assert index["source"] == str(dataset["out"].resolve()) and index["source_run"]["recipe"]["name"]
    shards = index["shards"]
    assert len(shards) > len(index["buckets"]) >= 2  # small --shard-mb: several shards per bucket
    cap = int(0.05 * 2**20)
    for s in shards:
        path = dest / s["path"]
        assert path.stat().st_size == s["bytes"]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 2 * s["samples"]
        assert s["samples"] == 1 or s["bytes"] <= cap + 10240  # tar end-of-archive padding
    assert sum(b["samples"] for b in index["buckets"].values()) == len(with_media)

    seen = {}
    urls = [str(dest / s["path"]) for s in shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        row = clips[key]
        assert meta["clip_id"] == key and meta["uri"] == row["uri"] and meta["n_frames"] == row["n_frames"]
        assert meta["text"] == row["source_caption"] == dataset["captions"][Path(row["uri"]).name]
        assert (meta["start_s"], meta["end_s"], meta["fps"]) == (row["start_s"], row["end_s"], row["fps"])
        assert Path(sample["__url__"]).parent.name == bucket_name(row["width"], row["height"])
        assert "media" not in meta and "embedding" not in meta
        _check_media(row, sample["mp4"])
        seen[key] = True
    assert set(seen) == with_media
    _no_partials(dest)


def test_jsonl_mp4_layout(dataset, tmp_path, monkeypatch):
    clips = dataset["clips"]
    dest = tmp_path / "folder"
    result = CliRunner().invoke(main, ["export", str(dataset["out"]), "--format", "jsonl-mp4", "-o", str(dest)])
    assert result.exit_code == 0, result.output
    assert "exported" in result.stdout and "MiB" in result.stdout
    kept = {c for c, r in clips.items() if r["kept"]}
    lines = [json.loads(x) for x in (dest / "metadata.jsonl").read_text().splitlines()]
    assert {x["clip_id"] for x in lines} == kept
    for x in lines:
        row = clips[x["clip_id"]]
        assert x["file_name"] == f"videos/{x['clip_id']}.mp4" and x["text"] == row["source_caption"]
        _check_media(row, (dest / x["file_name"]).read_bytes())
    with open(dest / "open_sora.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [str(dest.resolve() / x["file_name"]) for x in lines]
    for r, x in zip(table, lines, strict=True):
        assert int(r["num_frames"]) == x["n_frames"] and int(r["width"]) == x["width"]
        assert float(r["aspect_ratio"]) == pytest.approx(x["height"] / x["width"], abs=1e-5)
        assert int(r["file_size"]) == Path(r["path"]).stat().st_size and r["text"] == x["text"]
    prompts = (dest / "prompt.txt").read_text().splitlines()
    paths = (dest / "videos.txt").read_text().splitlines()
    assert prompts == [x["text"] for x in lines] and paths == [x["file_name"] for x in lines]

    import datasets  # the same folder is a Hugging Face VideoFolder (file_name in metadata.jsonl)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = datasets.load_dataset("videofolder", data_dir=str(dest), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    folder = folder.cast_column("video", datasets.Video(decode=False))
    assert len(folder) == len(lines)
    first = folder[0]
    _check_media(clips[first["clip_id"]], Path(first["video"]["path"]).read_bytes())
    _no_partials(dest)


def test_hf_parquet_loads_with_datasets(dataset, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    clips = dataset["clips"]
    dest = tmp_path / "hf"
    where = "kept AND width > height"
    report = export_dataset(dataset["out"], "hf", dest, where=where, text="source_caption", shard_mb=0.03)
    chosen = {c for c, r in clips.items() if r["kept"] and r["width"] > r["height"]}
    assert report.exported == len(chosen) > 1
    files = sorted((dest / "data").glob("train-*.parquet"))
    assert len(files) > 1 and all(f.name.endswith(f"-of-{len(files):05d}.parquet") for f in files)
    card = (dest / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and where in card and str(dataset["out"].resolve()) in card
    ds = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == len(chosen) and set(ds["clip_id"]) == chosen
    assert ds.features["video"].dtype == "binary"
    for item in ds:
        row = clips[item["clip_id"]]
        assert item["text"] == row["source_caption"] and item["fps"] == row["fps"]
        _check_media(row, item["video"])
    _no_partials(dest)


def test_export_refusals_and_atomicity(dataset, tmp_path):
    out = dataset["out"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_dataset(out, "hf", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(SelectError, match="bad --where"):
        export_dataset(out, "hf", tmp_path / "x", where="no_such_column")
    with pytest.raises(ExportError, match="inside the source"):
        export_dataset(out, "webdataset", out / "exports")
    assert not (tmp_path / "x").exists()

    result = CliRunner().invoke(main, ["export", str(out), "--format", "zip", "-o", str(tmp_path / "z")])
    assert result.exit_code == 2 and "zip" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["export", str(out), "--format", "hf", "--where", "kept AND", "-o",
                                       str(tmp_path / "z")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("clipmill: error: bad --where")

    dest = tmp_path / "wds"
    calls = []

    def interrupt(phase, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_dataset(out, "webdataset", dest, progress=interrupt)
    assert not dest.exists()  # nothing half-written is visible, and the hidden work folder is gone
    _no_partials(dest)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory may be the target
    report = export_dataset(out, "webdataset", empty, where="false")
    assert report.exported == 0 and json.loads((empty / "index.json").read_text())["shards"] == []
