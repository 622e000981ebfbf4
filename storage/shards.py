"""Atomic Parquet shards, commit records, recovery and the dataset's `run.json`.

Layout of a dataset directory OUT:

    OUT/run.json                     recipe, versions, counts, timings (rewritten atomically at each commit)
    OUT/videos/part-NNNNN.parquet    ledger rows, one per input
    OUT/clips/part-NNNNN.parquet     clip rows of the same videos
    OUT/_commits/part-NNNNN.json     commit record: files with sha256/bytes/rows, video_ids, uris
    OUT/.lock                        held (flock) by the one process writing OUT

A shard commits in three steps: (1) both Parquet files are written under hidden temporary names
(`.part-NNNNN.parquet.tmp`) and fsynced; (2) the commit record is written to a temporary name and renamed
into `_commits/` -- this rename is the commit point; (3) the data files are renamed to their final names.
A crash before (2) leaves only hidden temporaries, which `recover()` deletes; a crash between (2) and (3)
is rolled forward by `recover()`. A reader lists `_commits/`, so it never sees half a shard.

This module imports nothing else of clipmill but the schema.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.storage.schema import CLIPS_SCHEMA, SCHEMA_VERSION, VIDEOS_SCHEMA, schema_major

log = logging.getLogger(__name__)

COMMITS = "_commits"
RUN_JSON = "run.json"
LOCK = ".lock"
_PART = re.compile(r"^\.?part-(\d{5,})\.(parquet|json)(\.tmp)?$")


class DatasetError(RuntimeError):
    """OUT cannot be used: wrong schema version, not a clipmill dataset, locked, or unwritable."""


@dataclass(frozen=True)
class ShardFile:
    """One committed Parquet file of a shard."""

    path: str  # relative to OUT
    sha256: str
    bytes: int
    rows: int


@dataclass(frozen=True)
class CommitRecord:
    """What a commit promises: the shard's files (with checksums) and the inputs it holds."""

    shard: str
    schema_version: str
    created_at: str
    files: dict[str, ShardFile]
    video_ids: list[str]
    uris: list[str]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitRecord:
        return cls(
            shard=data["shard"], schema_version=data["schema_version"], created_at=data["created_at"],
            files={k: ShardFile(**v) for k, v in data["files"].items()},
            video_ids=list(data["video_ids"]), uris=list(data["uris"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard, "schema_version": self.schema_version, "created_at": self.created_at,
            "files": {k: vars(v) for k, v in self.files.items()},
            "video_ids": self.video_ids, "uris": self.uris,
        }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that renames and new names in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CRASH_ENV = "CLIPMILL_CRASH_AT"


def _crash_point(name: str, commits_done: int) -> None:
    """Fault injection for crash tests: SIGKILL this process at commit step `name` of commit number N,
    when CLIPMILL_CRASH_AT="<name>:<N>" (N counts this process's commits from 0). Never set in normal use."""
    spec = os.environ.get(CRASH_ENV)
    if spec and spec == f"{name}:{commits_done}":
        log.warning("CLIPMILL_CRASH_AT=%s: killing this process now", spec)
        os.kill(os.getpid(), signal.SIGKILL)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temporary file, fsync and rename (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (the checksum commit records hold)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet_durable(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` (zstd, the shards' row-group size) and fsync the file."""
    pq.write_table(table, path, compression="zstd", row_group_size=256)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def read_commits(out: str | os.PathLike) -> list[CommitRecord]:
    """All commit records of a dataset, in shard order. Empty when OUT has none yet."""
    cdir = Path(out) / COMMITS
    if not cdir.is_dir():
        return []
    records = []
    for p in sorted(cdir.glob("part-*.json")):
        with open(p, encoding="utf-8") as f:
            records.append(CommitRecord.from_json(json.load(f)))
    return records


def resolve_file(out: str | os.PathLike, rel: str) -> Path:
    """Path of a committed file; its hidden temporary name while a commit is being rolled forward."""
    final = Path(out) / rel
    if final.exists():
        return final
    tmp = _tmp_name(final)
    return tmp if tmp.exists() else final


def committed_files(out: str | os.PathLike, table: str) -> list[Path]:
    """Paths of the committed Parquet files of `table` ('videos' or 'clips')."""
    return [resolve_file(out, r.files[table].path) for r in read_commits(out) if table in r.files]


def read_table(out: str | os.PathLike, table: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of `table` as one Arrow table (columns missing in old shards read as NULL)."""
    schema = VIDEOS_SCHEMA if table == "videos" else CLIPS_SCHEMA
    parts = []
    for p in committed_files(out, table):
        t = pq.read_table(p, columns=[c for c in (columns or schema.names) if c in pq.read_schema(p).names])
        parts.append(t)
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([_conform(t, schema) for t in parts])


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [t[f.name] if f.name in t.column_names else pa.nulls(len(t), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def read_run_json(out: str | os.PathLike) -> dict[str, Any] | None:
    """The dataset's run.json, or None when there is none."""
    p = Path(out) / RUN_JSON
    if not p.exists():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def check_compatible(out: str | os.PathLike) -> None:
    """Raise DatasetError when OUT was written with another schema MAJOR version than this clipmill's."""
    meta = read_run_json(out)
    if meta is None:
        return
    theirs = meta.get("schema_version", "?")
    try:
        major = schema_major(theirs)
    except ValueError:
        major = -1
    if major != schema_major(SCHEMA_VERSION):
        raise DatasetError(
            f"{out} was written with clipmill schema {theirs}; this clipmill writes schema {SCHEMA_VERSION}. "
            f"Write to a new output directory, or use the clipmill version that wrote it."
        )


@dataclass
class ShardWriter:
    """Writes and commits shards into OUT; holds OUT's lock while open. Use as a context manager.

    Opening checks that OUT is a clipmill dataset of a compatible schema version (or empty / new),
    takes an exclusive lock (a second writer is refused), and recovers from an interrupted commit.
    """

    out: Path
    _lock_fd: int | None = field(default=None, repr=False)
    _next: int = 0
    _commits_done: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise DatasetError(f"{out} exists and is not a directory; choose another output directory")
        if out.is_dir() and not (out / RUN_JSON).exists() and not (out / COMMITS).exists():
            stray = [p.name for p in out.iterdir() if p.name != LOCK]
            if stray:
                raise DatasetError(
                    f"{out} is not empty and is not a clipmill dataset (found {', '.join(sorted(stray)[:3])}); "
                    f"choose a new or empty output directory"
                )
        check_compatible(out)
        try:
            for sub in ("videos", "clips", COMMITS):
                (out / sub).mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DatasetError(f"cannot write to {out}: {exc.strerror}; check the path and permissions") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DatasetError(
                f"{out} is being written by another clipmill run (pid {holder}); wait for it to finish "
                f"or write to another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        self.recover()

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self) -> None:
        """Roll committed-but-unrenamed shards forward; delete temporaries of uncommitted ones."""
        out = self.out
        highest = -1
        committed: set[str] = set()
        for rec in read_commits(out):
            committed.add(rec.shard)
            highest = max(highest, int(rec.shard.split("-")[1]))
            for sf in rec.files.values():
                final = out / sf.path
                tmp = _tmp_name(final)
                if not final.exists() and tmp.exists():
                    os.replace(tmp, final)
                    log.info("recovered %s (commit was recorded before a crash)", sf.path)
        for sub in ("videos", "clips", COMMITS):
            for p in (out / sub).iterdir():
                m = _PART.match(p.name)
                if not m:
                    continue
                highest = max(highest, int(m.group(1)))
                shard = f"part-{m.group(1)}"
                if p.name.startswith(".") or shard not in committed:
                    log.info("removing %s/%s left by an interrupted commit", sub, p.name)
                    p.unlink()
        self._next = highest + 1

    def commit(self, videos: pa.Table, clips: pa.Table) -> CommitRecord:
        """Write one shard (its videos and their clips) and commit it atomically. Returns the record."""
        if self._lock_fd is None:
            raise DatasetError("ShardWriter.commit() called before open()")
        videos = _conform(videos, VIDEOS_SCHEMA)
        clips = _conform(clips, CLIPS_SCHEMA)
        shard = f"part-{self._next:05d}"
        files: dict[str, ShardFile] = {}
        tmps: list[tuple[Path, Path]] = []
        record_path = self.out / COMMITS / f"{shard}.json"
        try:
            for table, data in (("videos", videos), ("clips", clips)):
                final = self.out / table / f"{shard}.parquet"
                tmp = _tmp_name(final)
                tmps.append((tmp, final))
                write_parquet_durable(data, tmp)
                files[table] = ShardFile(f"{table}/{shard}.parquet", file_sha256(tmp), tmp.stat().st_size, len(data))
            for table in ("videos", "clips"):
                fsync_dir(self.out / table)
            record = CommitRecord(
                shard=shard, schema_version=SCHEMA_VERSION, created_at=_now(), files=files,
                video_ids=videos["video_id"].to_pylist(), uris=videos["uri"].to_pylist(),
            )
            _crash_point("before_record", self._commits_done)
            write_json_atomic(record_path, record.to_json())  # the commit point
            _crash_point("after_record", self._commits_done)
        except OSError as exc:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
            record_path.with_name(f".{record_path.name}.tmp").unlink(missing_ok=True)
            raise DatasetError(
                f"cannot commit shard {shard} to {self.out}: {exc.strerror or exc}; nothing of it is visible. "
                f"Free space (or fix the directory) and run the same command again to resume"
            ) from exc
        try:
            for i, (tmp, final) in enumerate(tmps):
                os.replace(tmp, final)
                if i == 0:
                    _crash_point("mid_rename", self._commits_done)
            for table in ("videos", "clips"):
                fsync_dir(self.out / table)
        except OSError as exc:
            raise DatasetError(
                f"shard {shard} is committed but its files could not be renamed ({exc.strerror or exc}); the next "
                f"run on {self.out} completes it"
            ) from exc
        self._next += 1
        self._commits_done += 1
        return record


def committed_keys(out: str | os.PathLike) -> tuple[set[str], set[str]]:
    """(uris, video_ids) already committed in OUT: what a resumed run skips."""
    uris: set[str] = set()
    vids: set[str] = set()
    for rec in read_commits(out):
        uris.update(rec.uris)
        vids.update(rec.video_ids)
    return uris, vids


def iter_commit_counts(records: Iterable[CommitRecord]) -> dict[str, int]:
    """Totals over commit records: shards, videos, clips."""
    n_v = n_c = n_s = 0
    for r in records:
        n_s += 1
        n_v += r.files["videos"].rows if "videos" in r.files else 0
        n_c += r.files["clips"].rows if "clips" in r.files else 0
    return {"shards": n_s, "videos": n_v, "clips": n_c}
