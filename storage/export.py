"""Export a selection of clips for other trainers: WebDataset tars, MP4 + JSONL folders, Hugging Face Parquet.

Every format starts from `storage/select.py`: a SQL WHERE over the `clips` view (default `kept`) picks the
clips, which are then read shard by shard. Only clips whose `media` (the MP4 bytes) is present can be
exported; the others (media NULL: the recipe kept media for kept clips only, or none) are skipped and
counted -- nothing is re-cut from the source videos. Each clip's text is chosen by `text`: `auto` takes the
first non-empty of caption, prompt_long, prompt_short, source_caption (or name one of them); a clip with
none gets "" (and is counted).

Formats (DIR is the export directory):

  webdataset   DIR/<bucket>/shard-NNNNN.tar, one sample per clip: `<clip_id>.mp4` (the MP4 bytes) and
               `<clip_id>.json` (text, caption, prompts, scores, source uri, span, fps, width, height,
               frames; every clip column except media, thumbnail and embedding). Shards hold at most
               `shard_mb` MB (a single larger sample gets a shard of its own). Buckets group clips of one
               resolution class and aspect class, so a loader can batch same-shaped clips:
                 resolution class = the largest of 2160p, 1440p, 1080p, 720p, 480p, 360p, 240p, 144p not
                                    above the clip's shorter side ("lt144p" below 144 pixels);
                 aspect class     = the nearest of the standard ratios of `schema.aspect_bucket`
                                    (21:9 ... 9:16), written with "x" (16x9).
               e.g. a 256x144 clip goes to `144p_16x9/`. index.json lists every shard (bucket, samples,
               bytes, sha256) and every bucket.
  jsonl-mp4    DIR/videos/<clip_id>.mp4 plus
                 metadata.jsonl  one object per clip: `file_name` (relative to DIR, the Hugging Face
                                 VideoFolder convention), `text`, and the same fields as the json above;
                 open_sora.csv   Open-Sora's columns: path (absolute), text, num_frames, height, width,
                                 aspect_ratio (height/width), fps, resolution (height*width), file_size;
                 prompt.txt + videos.txt  diffusers' text-to-video fine-tuning "two files" layout (one
                                 prompt per line, line-aligned with a path relative to DIR).
  hf           DIR/data/train-NNNNN-of-MMMMM.parquet with columns clip_id, text, video (the MP4 bytes,
               binary) and the metadata fields, plus a README.md dataset card (YAML `configs` for
               `datasets.load_dataset(DIR)`, features, counts, the WHERE and provenance). Files hold at most
               `shard_mb` MB; row groups are small, so readers stream a few clips at a time.

Atomicity: the whole export is written into a hidden sibling `.<DIR name>.partial-<pid>/` (every file in
it written then renamed), and renamed to DIR when complete, so DIR is either absent or complete. An export
that fails or is interrupted (Ctrl-C) removes its hidden folder; one that is killed leaves it, and the next
export to the same DIR removes it. DIR must be
new or an empty directory. Every format writes DIR/index.json: format, source, WHERE, time, counts,
skipped clips, the source's run.json recipe, and its files.

What it does not do: no re-encoding, resizing or frame-count bucketing (the bundled trainer buckets by
frames itself), no upload to a hub, and no remote DIR.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.storage.schema import CLIPS_SCHEMA, aspect_bucket
from clipmill.storage.select import (
    DEFAULT_WHERE,
    SelectError,
    check_dataset,
    iter_selected,
    select_clips,
)
from clipmill.storage.shards import fsync_dir, read_run_json, write_json_atomic

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "jsonl-mp4", "hf")
TEXT_FIELDS = ("caption", "prompt_long", "prompt_short", "source_caption")
TEXT_CHOICES = ("auto",) + TEXT_FIELDS
DEFAULT_SHARD_MB = 512.0
INDEX = "index.json"
# Clip columns not copied into the per-clip metadata (bytes and large vectors).
HEAVY = ("media", "thumbnail", "embedding")
META_COLUMNS = tuple(n for n in CLIPS_SCHEMA.names if n not in HEAVY)
RESOLUTION_CLASSES = ((2160, "2160p"), (1440, "1440p"), (1080, "1080p"), (720, "720p"), (480, "480p"),
                      (360, "360p"), (240, "240p"), (144, "144p"))
BUCKET_RULES = ("resolution class = the largest of 2160p/1440p/1080p/720p/480p/360p/240p/144p not above the "
                "clip's shorter side (lt144p below); aspect class = nearest standard ratio (schema.aspect_bucket) "
                "with ':' written 'x'; bucket = '<resolution>_<aspect>'")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "export" with clips done / selected."""


class ExportError(SelectError):
    """An export cannot be made (bad format/option/destination); the message says what to do."""


@dataclass
class ExportReport:
    """What `export_dataset` wrote."""

    format: str
    source: str
    dest: str
    where: str
    text: str
    selected: int = 0
    exported: int = 0
    bytes: int = 0  # MP4 bytes exported
    files: int = 0
    skipped_no_media: int = 0
    without_text: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: clips, bytes, seconds, and what was skipped."""
        rate = self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0
        parts = [f"exported {self.exported} of {self.selected} selected clip(s) as {self.format} to {self.dest}: "
                 f"{self.bytes / 2**20:.1f} MiB of MP4 in {self.files} file(s), {self.seconds:.1f} s "
                 f"({rate:.1f} MiB/s)"]
        if self.skipped_no_media:
            parts.append(f"skipped {self.skipped_no_media} clip(s) without media (the recipe did not keep their "
                         f"MP4; select kept clips, or re-run with write.media: all)")
        if self.without_text:
            parts.append(f"{self.without_text} clip(s) have no text (exported with text \"\")")
        return "; ".join(parts)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def resolution_class(width: int | None, height: int | None) -> str:
    """Resolution class of a frame size by its shorter side: '144p' ... '2160p', 'lt144p', or 'unknown'."""
    if not width or not height:
        return "unknown"
    short = min(int(width), int(height))
    for px, name in RESOLUTION_CLASSES:
        if short >= px:
            return name
    return "lt144p"


def bucket_name(width: int | None, height: int | None) -> str:
    """Bucket of a clip: '<resolution class>_<aspect class>', e.g. '720p_16x9' (see the module docstring)."""
    aspect = aspect_bucket(int(width or 0), int(height or 0)).replace(":", "x")
    return f"{resolution_class(width, height)}_{aspect}"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def clip_text(row: dict[str, Any], text: str) -> str:
    """The text exported for a clip row: the named field, or with 'auto' the first non-empty of TEXT_FIELDS."""
    fields = TEXT_FIELDS if text == "auto" else (text,)
    for name in fields:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def clip_metadata(row: dict[str, Any], text: str) -> dict[str, Any]:
    """JSON-able metadata of one clip row: `text` first, then every column but media/thumbnail/embedding."""
    meta: dict[str, Any] = {"text": clip_text(row, text)}
    for name in META_COLUMNS:
        meta[name] = _plain(row.get(name))
    return meta


# ---------------------------------------------------------------------------------------------------------
# destination handling
# ---------------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_dest(dest: Path, source: Path) -> Path:
    """Check DEST, remove stale partial exports of it, and create this export's hidden partial folder."""
    src, dst = source.resolve(), dest.resolve()
    if dst == src or src in dst.parents:
        raise ExportError(f"the export {dest} cannot be inside the source dataset {source}; choose another -o")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a directory; choose a new -o directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise ExportError(f"{dest} is not empty; choose a new -o directory (or remove it first)")
    parent = dst.parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise ExportError(f"cannot create {parent}: {exc.strerror}; check the path and permissions") from exc
    for p in parent.iterdir():
        m = _PARTIAL.match(p.name)
        if m and m.group("name") == dst.name and p.is_dir() and not _pid_alive(int(m.group("pid"))):
            log.info("removing %s left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)
    work = parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        work.mkdir()
    except FileExistsError:
        raise ExportError(f"{work} exists: another export to {dest} is running in this process") from None
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror}; check the path and permissions") from exc
    return work


def _publish(work: Path, dest: Path) -> None:
    """Rename the finished partial folder to DEST (an empty DEST directory is replaced)."""
    dst = dest.resolve()
    if dst.is_dir():
        if any(dst.iterdir()):
            raise ExportError(f"{dest} was filled by another process during the export; choose a new -o directory")
        dst.rmdir()
    os.replace(work, dst)
    fsync_dir(dst.parent)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------

class _Writer:
    """One export format: `add(row, text, metadata)` per clip, `close()` returns extra index entries."""

    def __init__(self, work: Path, final: Path, shard_bytes: int) -> None:
        self.work, self.final, self.shard_bytes = work, final, shard_bytes
        self.files = 0

    def add(self, row: dict[str, Any], meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        raise NotImplementedError

    def abort(self) -> None:
        """Close open files after an error (the partial folder is left for the next export to remove)."""


class _TarShard:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 0

    def add(self, name: str, data: bytes, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(mtime)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.bytes += 512 + (len(data) + 511) // 512 * 512

    def close(self) -> dict[str, Any]:
        self.tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"samples": self.samples, "bytes": self.path.stat().st_size, "sha256": _sha256(self.path)}

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self._file.close()


class _WebDatasetWriter(_Writer):
    def __init__(self, work: Path, final: Path, shard_bytes: int) -> None:
        super().__init__(work, final, shard_bytes)
        self.open: dict[str, _TarShard] = {}
        self.count: dict[str, int] = {}
        self.shards: list[dict[str, Any]] = []
        self.buckets: dict[str, dict[str, Any]] = {}
        self.mtime = time.time()

    def add(self, row: dict[str, Any], meta: dict[str, Any]) -> None:
        bucket = bucket_name(row.get("width"), row.get("height"))
        key = row["clip_id"]
        media = row["media"]
        body = json.dumps(meta, ensure_ascii=False, sort_keys=False).encode()
        size = 1024 + (len(media) + 511) // 512 * 512 + (len(body) + 511) // 512 * 512
        shard = self.open.get(bucket)
        if shard is not None and shard.samples and shard.bytes + size > self.shard_bytes:
            self._close_shard(bucket)
            shard = None
        if shard is None:
            n = self.count.get(bucket, 0)
            self.count[bucket] = n + 1
            folder = self.work / bucket
            folder.mkdir(exist_ok=True)
            shard = self.open[bucket] = _TarShard(folder / f"shard-{n:05d}.tar")
            info = self.buckets.setdefault(bucket, {
                "resolution": resolution_class(row.get("width"), row.get("height")),
                "aspect": aspect_bucket(int(row.get("width") or 0), int(row.get("height") or 0)),
                "samples": 0, "bytes": 0, "shards": []})
            info["shards"].append(f"{bucket}/{shard.path.name}")
        shard.add(f"{key}.mp4", media, self.mtime)
        shard.add(f"{key}.json", body, self.mtime)
        shard.samples += 1

    def _close_shard(self, bucket: str) -> None:
        shard = self.open.pop(bucket)
        entry = {"path": f"{bucket}/{shard.path.name}", "bucket": bucket} | shard.close()
        self.shards.append(entry)
        self.buckets[bucket]["samples"] += entry["samples"]
        self.buckets[bucket]["bytes"] += entry["bytes"]
        self.files += 1

    def close(self) -> dict[str, Any]:
        for bucket in sorted(self.open):
            self._close_shard(bucket)
        for bucket in self.buckets:
            fsync_dir(self.work / bucket)
        self.shards.sort(key=lambda s: s["path"])
        return {"bucket_rules": BUCKET_RULES, "buckets": dict(sorted(self.buckets.items())), "shards": self.shards,
                "members": {"mp4": "the clip's H.264 MP4 bytes", "json": "text + clip metadata (UTF-8 JSON)"}}

    def abort(self) -> None:
        for shard in self.open.values():
            shard.abort()


class _JsonlMp4Writer(_Writer):
    def __init__(self, work: Path, final: Path, shard_bytes: int) -> None:
        super().__init__(work, final, shard_bytes)
        (work / "videos").mkdir()
        self._meta = open(work / ".metadata.jsonl.tmp", "w", encoding="utf-8")  # noqa: SIM115
        self._csv_file = open(work / ".open_sora.csv.tmp", "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file, lineterminator="\n")
        self._csv.writerow(["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution",
                            "file_size"])
        self._prompts = open(work / ".prompt.txt.tmp", "w", encoding="utf-8")  # noqa: SIM115
        self._paths = open(work / ".videos.txt.tmp", "w", encoding="utf-8")  # noqa: SIM115
        self.rows = 0

    def add(self, row: dict[str, Any], meta: dict[str, Any]) -> None:
        rel = f"videos/{row['clip_id']}.mp4"
        media = row["media"]
        _write_bytes_atomic(self.work / rel, media)
        self.files += 1
        self._meta.write(json.dumps({"file_name": rel} | meta, ensure_ascii=False) + "\n")
        w, h = row.get("width") or 0, row.get("height") or 0
        one_line = " ".join(meta["text"].split())
        self._csv.writerow([str(self.final / rel), one_line, row.get("n_frames"), h, w,
                            round(h / w, 6) if w else "", row.get("fps"), h * w, len(media)])
        self._prompts.write(one_line + "\n")
        self._paths.write(rel + "\n")
        self.rows += 1

    def close(self) -> dict[str, Any]:
        for f, name in ((self._meta, "metadata.jsonl"), (self._csv_file, "open_sora.csv"),
                        (self._prompts, "prompt.txt"), (self._paths, "videos.txt")):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.work / f".{name}.tmp", self.work / name)
            self.files += 1
        fsync_dir(self.work / "videos")
        return {"files": {"videos": "videos/<clip_id>.mp4", "metadata": "metadata.jsonl",
                          "open_sora": "open_sora.csv", "diffusers_prompts": "prompt.txt",
                          "diffusers_videos": "videos.txt"}}

    def abort(self) -> None:
        for f in (self._meta, self._csv_file, self._prompts, self._paths):
            f.close()


HF_ROW_GROUP_BYTES = 64 * 2**20


def hf_schema() -> pa.Schema:
    """Arrow schema of the hf export's Parquet files: clip_id, text, video (MP4 bytes), then metadata."""
    fields = [pa.field("clip_id", pa.string()), pa.field("text", pa.string()), pa.field("video", pa.binary())]
    fields += [CLIPS_SCHEMA.field(n) for n in META_COLUMNS if n != "clip_id"]
    return pa.schema(fields)


class _HFWriter(_Writer):
    def __init__(self, work: Path, final: Path, shard_bytes: int) -> None:
        super().__init__(work, final, shard_bytes)
        (work / "data").mkdir()
        self.schema = hf_schema()
        self.parts: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows: list[dict[str, Any]] = []
        self._rows_bytes = 0
        self._file_bytes = 0
        self._file_rows = 0

    def add(self, row: dict[str, Any], meta: dict[str, Any]) -> None:
        size = len(row["media"])
        if self._writer is not None and self._file_rows and self._file_bytes + size > self.shard_bytes:
            self._close_file()
        if self._writer is None:
            self._path = self.work / "data" / f".train-{len(self.parts):05d}.parquet.tmp"
            self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd")
        out = {n: row.get(n) for n in self.schema.names}
        out.update(text=meta["text"], video=row["media"])
        self._rows.append(out)
        self._rows_bytes += size
        self._file_bytes += size
        self._file_rows += 1
        if self._rows_bytes >= HF_ROW_GROUP_BYTES or len(self._rows) >= 256:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._rows, self._rows_bytes = [], 0

    def _close_file(self) -> None:
        self._flush_rows()
        assert self._writer is not None and self._path is not None
        self._writer.close()
        with open(self._path, "rb") as f:
            os.fsync(f.fileno())
        self.parts.append({"tmp": self._path, "rows": self._file_rows})
        self._writer, self._path, self._file_bytes, self._file_rows = None, None, 0, 0

    def close(self) -> dict[str, Any]:
        if self._writer is not None:
            self._close_file()
        if not self.parts:  # an empty selection still gives a loadable (empty) dataset
            self._path = self.work / "data" / ".train-00000.parquet.tmp"
            self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd")
            self._close_file()
        files = []
        n = len(self.parts)
        for i, part in enumerate(self.parts):
            final = self.work / "data" / f"train-{i:05d}-of-{n:05d}.parquet"
            os.replace(part["tmp"], final)
            files.append({"path": f"data/{final.name}", "rows": part["rows"], "bytes": final.stat().st_size,
                          "sha256": _sha256(final)})
            self.files += 1
        fsync_dir(self.work / "data")
        return {"files": files, "features": {f.name: str(f.type) for f in self.schema}}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()


WRITERS: dict[str, type[_Writer]] = {"webdataset": _WebDatasetWriter, "jsonl-mp4": _JsonlMp4Writer, "hf": _HFWriter}


# ---------------------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------------------

def export_dataset(out: str | os.PathLike, fmt: str, dest: str | os.PathLike, *, where: str = DEFAULT_WHERE,
                   text: str = "auto", shard_mb: float = DEFAULT_SHARD_MB,
                   progress: Progress | None = None) -> ExportReport:
    """Export the clips of dataset OUT matching `where` in format `fmt` to the new directory DEST.

    See the module docstring for the formats, buckets, atomicity and what is skipped. Raises ExportError /
    SelectError (both ValueError) with a one-line message for user errors; nothing is left in DEST then.
    """
    t0 = time.monotonic()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if text not in TEXT_CHOICES:
        raise ExportError(f"unknown text field {text!r}; choose one of {', '.join(TEXT_CHOICES)}")
    if not shard_mb > 0:
        raise ExportError(f"--shard-mb must be > 0, got {shard_mb}")
    source = check_dataset(out)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a directory; choose a new -o directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise ExportError(f"{dest} is not empty; choose a new -o directory (or remove it first)")
    selection = select_clips(source, where)
    report = ExportReport(format=fmt, source=str(source.resolve()), dest=str(dest), where=selection.where,
                          text=text, selected=selection.n_clips)
    work = _prepare_dest(dest, source)
    writer = WRITERS[fmt](work, dest.resolve(), int(shard_mb * 2**20))
    try:
        done = 0
        if progress:
            progress("export", 0, selection.n_clips)
        for rows in iter_selected(selection, videos=False):
            for batch in rows.clips.to_batches(max_chunksize=64):
                for row in batch.to_pylist():
                    done += 1
                    if row.get("media") is None:
                        report.skipped_no_media += 1
                        continue
                    meta = clip_metadata(row, text)
                    if not meta["text"]:
                        report.without_text += 1
                    writer.add(row, meta)
                    report.exported += 1
                    report.bytes += len(row["media"])
                    bucket = bucket_name(row.get("width"), row.get("height"))
                    report.buckets[bucket] = report.buckets.get(bucket, 0) + 1
                if progress:
                    progress("export", done, selection.n_clips)
        extra = writer.close()
        report.files = writer.files + 1 + (1 if fmt == "hf" else 0)
        report.seconds = time.monotonic() - t0
        index = _index(report, source, selection.where) | extra
        if fmt == "hf":
            (work / "README.md").write_text(_dataset_card(report, index), encoding="utf-8")
        write_json_atomic(work / INDEX, index)
        _publish(work, dest)
    except BaseException:
        writer.abort()
        shutil.rmtree(work, ignore_errors=True)  # ours and incomplete; DEST was never touched
        raise
    if report.skipped_no_media:
        log.info("export: %d selected clip(s) have no media and were skipped", report.skipped_no_media)
    report.seconds = time.monotonic() - t0
    log.info("%s", report.summary())
    return report


def _index(report: ExportReport, source: Path, where: str) -> dict[str, Any]:
    src_meta = read_run_json(source) or {}
    return {
        "format": report.format, "created_at": _now(), "tool": "clipmill export",
        "source": str(source.resolve()), "where": where, "text_field": report.text,
        "counts": {"selected": report.selected, "exported": report.exported, "bytes": report.bytes,
                   "skipped_no_media": report.skipped_no_media, "without_text": report.without_text},
        "bucket_counts": dict(sorted(report.buckets.items())),
        "source_run": {k: src_meta.get(k) for k in ("schema_version", "created_at", "recipe", "versions", "counts",
                                                    "subset") if k in src_meta},
    }


def _dataset_card(report: ExportReport, index: dict[str, Any]) -> str:
    n = report.exported
    size = ("n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else
            "100K<n<1M" if n < 1_000_000 else "n>1M")
    feats = "\n".join(f"| `{name}` | {typ} |" for name, typ in index["features"].items())
    buckets = "\n".join(f"| {b} | {c} |" for b, c in index["bucket_counts"].items()) or "| - | 0 |"
    recipe = (index["source_run"].get("recipe") or {}).get("name", "unknown")
    where = report.where.replace("`", "'")
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
task_categories:
- text-to-video
tags:
- video
- clipmill
size_categories:
- {size}
---

# clipmill export

Text-to-video training clips exported by `clipmill export --format hf` on {index["created_at"]}.

- **Source dataset:** `{index["source"]}` (recipe `{recipe}`)
- **Selection:** `WHERE {where}` over the source's `clips` view
- **Text column:** `{report.text}` ({"first non-empty of " + ", ".join(TEXT_FIELDS) if report.text == "auto"
                                    else "the clip's " + report.text})
- **Clips:** {report.exported} exported of {report.selected} selected; {report.skipped_no_media} skipped without
  media; {report.without_text} without text
- **Video bytes:** {report.bytes} (H.264 MP4 per clip, in the binary column `video`)

## Loading

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")
import av, io
with av.open(io.BytesIO(ds[0]["video"])) as c:
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
```

## Features

| column | type |
|---|---|
{feats}

## Clips per bucket (resolution class _ aspect class)

| bucket | clips |
|---|---|
{buckets}

Provenance (source run.json recipe, versions, counts) is in `index.json`.
"""


__all__ = [
    "BUCKET_RULES", "DEFAULT_SHARD_MB", "ExportError", "ExportReport", "FORMATS", "TEXT_CHOICES", "bucket_name",
    "clip_metadata", "clip_text", "export_dataset", "hf_schema", "resolution_class",
]
