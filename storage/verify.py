"""Verify a dataset against its commit records, and repair it by quarantining what is broken.

`verify_dataset(OUT)` reads every commit record in `OUT/_commits/` and checks what it promises:

  record      the JSON parses and has every field; its shard name matches its file name; its paths stay
              inside OUT (`videos/...`, `clips/...`); it lists a videos file; its schema MAJOR is ours;
              its `video_ids` and `uris` equal the videos file's columns, in order.
  missing     every listed file exists (under its final name, or under its hidden temporary name while a
              commit is being rolled forward -- what readers use, see `shards.resolve_file`).
  size        the file has the recorded number of bytes.
  checksum    its sha256 equals the recorded one (skipped with `checksums=False`).
  unreadable  it opens as Parquet and its key columns decode.
  rows        the Parquet footer holds the recorded row count; every clip row belongs to a video of the
              same shard.
  schema      the file's schema MAJOR (from its metadata) is ours, it holds the table it is listed as, the
              key columns are present, and every column it has that storage/schema.py knows has that type
              (columns it lacks are fine: they read as NULL; unknown columns are ignored).
  duplicate   no clip_id and no input uri appears twice in one shard or in two shards. Between two
              shards the later one is the problem (the earlier one keeps its rows); shards broken for
              another reason are left out of this comparison, so their rows do not condemn a good shard.

It also lists leftovers, which are warnings, not errors: hidden temporaries of interrupted commits,
files no record references (e.g. what an interrupted `dedup` leaves), `_tmp_dedup/`, and committed files
still under their temporary name (a commit interrupted after its commit point; the next writer renames
them). A damaged `run.json` is a problem too (every writer refuses OUT until it is fixed).

`repair_dataset(OUT)` takes OUT's write lock, and moves every broken shard -- its data files first, its
commit record last -- into `OUT/_quarantine/<UTC timestamp>/` under the same relative paths, with a
`quarantine.json` that says why. It never deletes a committed or unreferenced file; it deletes only
temporaries (never committed) and `_tmp_dedup/`. Readers and `committed_keys` then no longer see the
quarantined shards, so the same `clipmill run` command re-processes exactly their inputs (resume keys on
the URIs in commit records). A second repair finds nothing to do.

What it does not do: it does not re-run any stage, decode media, or check column values beyond the keys
(a score that is wrong but well-typed passes); it does not restore anything from `_quarantine/`; it does
not repair a damaged `run.json` (it says how). `verify_dataset` takes no lock: while another process
writes OUT the report may show that process's in-flight files (the report says when a writer is active).
Costs on a large dataset: every commit record is parsed (small); every file is stat()ed and its Parquet
footer read; the key columns (video_id, uri, clip_id -- never media or embeddings) are read once; with
checksums every byte is read once (sha256, the dominant cost: the dataset's size at disk speed). Memory:
the URIs of all shards (as `committed_keys` holds them) plus one 8-byte hash per clip.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.storage.schema import CLIPS_SCHEMA, SCHEMA_MAJOR, VIDEOS_SCHEMA, schema_major
from clipmill.storage.shards import (
    COMMITS,
    LOCK,
    RUN_JSON,
    CommitRecord,
    DatasetError,
    ShardWriter,
    file_sha256,
    fsync_dir,
)

log = logging.getLogger(__name__)

QUARANTINE = "_quarantine"
TMP_DEDUP = "_tmp_dedup"  # storage/dedup.py's TMP_DIR (not imported: dedup pulls in more than we need)
MANIFEST = "quarantine.json"
TABLES = ("videos", "clips")
PROBLEM_KINDS = ("missing", "size", "checksum", "unreadable", "rows", "schema", "duplicate", "record")
LEFTOVER_KINDS = ("temp", "unreferenced", "tmp_dedup", "pending")
KEY_COLUMNS = {"videos": ("video_id", "uri"), "clips": ("clip_id", "video_id")}
SCHEMAS = {"videos": VIDEOS_SCHEMA, "clips": CLIPS_SCHEMA}
EXAMPLES = 3  # ids quoted in one problem's detail

# A data file of shard part-NNNNN: final, dedup revision (.rK) or hidden temporary of either.
_SHARD_FILE = re.compile(r"^\.?(part-\d{5,})(\.r\d+)?\.parquet(\.tmp)?$")

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "verify" once per commit record checked."""

_PARQUET_ERRORS = (pa.ArrowException, OSError)


@dataclass(frozen=True)
class Problem:
    """One broken promise of a commit record. `shard` is None only for a dataset-wide file (run.json)."""

    shard: str | None
    file: str | None  # relative to OUT
    kind: str  # one of PROBLEM_KINDS
    detail: str


@dataclass(frozen=True)
class Leftover:
    """A file no reader uses (a warning): `kind` is one of LEFTOVER_KINDS; `path` is relative to OUT."""

    path: str
    kind: str
    detail: str


@dataclass
class VerifyReport:
    """What `verify_dataset` found. `ok` is True when there is no problem (leftovers do not count)."""

    out: str
    checksums: bool
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    broken_shards: list[str] = field(default_factory=list)
    rerun_uris: list[str] = field(default_factory=list)  # inputs a rerun will process after a repair
    shards: int = 0
    files: int = 0
    bytes: int = 0
    bytes_hashed: int = 0
    videos: int = 0
    clips: int = 0
    writer_active: bool = False
    seconds: float = 0.0
    # sha256 of each commit record's bytes: lets `repair_dataset` tell whether OUT changed since.
    record_digests: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """No problem found (leftovers are warnings and do not make a dataset not ok)."""
        return not self.problems

    @property
    def clean(self) -> bool:
        """No problem and no leftover."""
        return self.ok and not self.leftovers

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json` and logs (every problem, leftover and URI; no record digests)."""
        return {
            "out": self.out, "ok": self.ok, "checksums": self.checksums, "writer_active": self.writer_active,
            "counts": {"shards": self.shards, "broken_shards": len(self.broken_shards), "files": self.files,
                       "bytes": self.bytes, "bytes_hashed": self.bytes_hashed, "videos": self.videos,
                       "clips": self.clips, "problems": len(self.problems), "leftovers": len(self.leftovers),
                       "rerun_uris": len(self.rerun_uris)},
            "problems": [asdict(p) for p in self.problems],
            "leftovers": [asdict(w) for w in self.leftovers],
            "broken_shards": list(self.broken_shards),
            "rerun_uris": list(self.rerun_uris),
            "seconds": round(self.seconds, 3),
        }

    def format(self, max_lines: int = 20) -> str:
        """A terminal report: what was checked, each problem and leftover, and exactly what to do next."""
        how = "sizes + sha256" if self.checksums else "sizes only, no checksums"
        lines = [f"clipmill verify {self.out}: {self.shards} shard(s), {self.files} file(s), "
                 f"{_human(self.bytes)} ({how}), {self.videos} video row(s), {self.clips} clip row(s) "
                 f"in {self.seconds:.1f} s"]
        if self.writer_active:
            lines.append("NOTE: another clipmill process is writing this dataset now; files it is writing may "
                         "show up below. Verify again when it has finished.")
        if self.problems:
            lines.append(f"PROBLEMS: {len(self.problems)} in {len(self.broken_shards)} shard(s) "
                         f"({', '.join(_clip_list(self.broken_shards, 8))}):")
            for p in self.problems[:max_lines]:
                lines.append(f"  {p.shard or '-'}  {p.file or '-'}  {p.kind}: {p.detail}")
            if len(self.problems) > max_lines:
                lines.append(f"  ... and {len(self.problems) - max_lines} more (all of them with --json)")
        if self.leftovers:
            lines.append(f"Warnings: {len(self.leftovers)} leftover(s) that no reader uses:")
            for w in self.leftovers[:max_lines]:
                lines.append(f"  {w.path}  {w.kind}: {w.detail}")
            if len(self.leftovers) > max_lines:
                lines.append(f"  ... and {len(self.leftovers) - max_lines} more (all of them with --json)")
        intact = ("every commit record's files are present and intact" if self.checksums else
                  "every commit record's files are present with the recorded sizes and rows (contents not "
                  "checksummed; drop the no-checksum option to check them)")
        if self.ok and not self.leftovers:
            lines.append(f"OK: {intact}. Nothing to do.")
            return "\n".join(lines)
        if self.ok:
            lines.append(f"OK: {intact}. To clean up the leftovers (optional), run "
                         f"`clipmill verify {self.out} --repair`.")
            return "\n".join(lines)
        if any(p.shard is None and p.file == RUN_JSON for p in self.problems):
            lines.append(f"What to do: first move {self.out}/{RUN_JSON} aside by hand (e.g. `mv {self.out}/{RUN_JSON} "
                         f"{self.out}/{RUN_JSON}.bad`; the next `clipmill run` writes a new one), then verify again.")
            return "\n".join(lines)
        n = len(self.rerun_uris)
        what = (f"then the same `clipmill run` command to re-process {n} input(s)" if n else
                "no input needs re-processing (the affected inputs are still committed in other shards)")
        lines.append(f"What to do: run `clipmill verify {self.out} --repair` (moves the {len(self.broken_shards)} "
                     f"broken shard(s) to {self.out}/{QUARANTINE}/, deletes nothing), {what}.")
        if n:
            lines.append(f"Inputs to re-process ({n}):")
            lines.extend(f"  {u}" for u in self.rerun_uris[:max_lines])
            if n > max_lines:
                lines.append(f"  ... and {n - max_lines} more (all of them with --json)")
        return "\n".join(lines)


@dataclass
class RepairReport:
    """What `repair_dataset` did. `changed` is False when there was nothing to do."""

    out: str
    quarantine_dir: str | None = None  # relative to OUT; None when nothing was moved
    quarantined_shards: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # paths relative to OUT, now under quarantine_dir
    unreferenced: list[str] = field(default_factory=list)  # those of `moved` that no record listed
    removed: list[str] = field(default_factory=list)  # temporaries deleted
    rolled_forward: list[str] = field(default_factory=list)  # committed files renamed to their final name
    rerun_uris: list[str] = field(default_factory=list)
    reverified: bool = False  # True when the given report was stale (or absent) and OUT was verified again

    @property
    def changed(self) -> bool:
        """Whether repair changed anything on disk."""
        return bool(self.moved or self.removed or self.rolled_forward)

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json` and logs."""
        return asdict(self) | {"changed": self.changed}

    def format(self, max_lines: int = 20) -> str:
        """A terminal report: what moved where, what was deleted, and what to run next."""
        if not self.changed:
            return f"clipmill verify --repair {self.out}: nothing to repair (no broken shard, no leftover)."
        lines = [f"clipmill verify --repair {self.out}:"]
        if self.moved:
            what = []
            if self.quarantined_shards:
                what.append(f"{len(self.moved) - len(self.unreferenced)} file(s) of {len(self.quarantined_shards)} "
                            f"broken shard(s) ({', '.join(_clip_list(self.quarantined_shards, 8))})")
            if self.unreferenced:
                what.append(f"{len(self.unreferenced)} unreferenced file(s)")
            lines.append(f"  moved {' and '.join(what)} to "
                         f"{self.out}/{self.quarantine_dir}/ (nothing deleted; {MANIFEST} there says why and "
                         f"how to restore)")
        if self.removed:
            lines.append(f"  deleted {len(self.removed)} temporary file(s)/folder(s) of interrupted writes")
        if self.rolled_forward:
            lines.append(f"  renamed {len(self.rolled_forward)} committed file(s) left under a temporary name")
        n = len(self.rerun_uris)
        if n:
            lines.append(f"Next: run the same `clipmill run` command again; it re-processes these {n} input(s):")
            lines.extend(f"  {u}" for u in self.rerun_uris[:max_lines])
            if n > max_lines:
                lines.append(f"  ... and {n - max_lines} more (all of them with --json)")
        else:
            lines.append("No input needs re-processing.")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Shard:
    """One commit record being checked: what it lists and what its files hold."""

    name: str
    record: CommitRecord | None
    problems: list[Problem] = field(default_factory=list)
    file_uris: list[str] = field(default_factory=list)  # uri column of the videos file, when readable
    clip_hashes: np.ndarray | None = None

    def add(self, file: str | None, kind: str, detail: str) -> None:
        self.problems.append(Problem(self.name, file, kind, detail))


def verify_dataset(out: str | os.PathLike, *, checksums: bool = True,
                   progress: Progress | None = None) -> VerifyReport:
    """Check every commit record of dataset OUT against its files; list problems, leftovers, inputs to re-run.

    Reads only (takes no lock, changes nothing). Raises DatasetError when OUT is not a clipmill dataset or
    was written with another schema MAJOR version (that clipmill's verify must judge it). See the module
    docstring for each check and its cost; `checksums=False` skips the sha256 pass (the costly one), so a
    changed byte inside a data page of the right size may then go unnoticed.
    """
    t0 = time.monotonic()
    out = Path(out)
    if not out.is_dir() or not ((out / COMMITS).is_dir() or (out / RUN_JSON).exists()):
        raise DatasetError(f"{out} is not a clipmill dataset (no {COMMITS}/ or {RUN_JSON}); give the OUT of a "
                           f"`clipmill run`")
    report = VerifyReport(out=str(out), checksums=checksums, writer_active=_writer_active(out))
    _check_run_json(out, report)

    record_paths = sorted((out / COMMITS).glob("part-*.json")) if (out / COMMITS).is_dir() else []
    shards: list[_Shard] = []
    for i, path in enumerate(record_paths):
        shard = _read_record(out, path, report)
        if shard.record is not None:
            _check_files(out, shard, checksums, report)
        shards.append(shard)
        if progress:
            progress("verify", i + 1, len(record_paths))
    report.shards = len(shards)
    _check_cross_shard_duplicates(out, shards)

    broken = [s for s in shards if s.problems]
    for s in shards:
        report.problems.extend(s.problems)
    report.broken_shards = [s.name for s in broken]
    kept_uris = {u for s in shards if not s.problems and s.record for u in s.record.uris}
    lost: set[str] = set()
    for s in broken:
        lost.update(s.record.uris if s.record else ())
        lost.update(s.file_uris)
    report.rerun_uris = sorted(lost - kept_uris)
    report.leftovers = _find_leftovers(out, shards)
    report.seconds = time.monotonic() - t0
    for p in report.problems:
        log.info("verify %s: %s %s %s: %s", out, p.shard or "-", p.file or "-", p.kind, p.detail)
    log.info("verify %s: %d shard(s), %d problem(s) in %d shard(s), %d leftover(s), %d input(s) to re-run "
             "(%.1f s)", out, report.shards, len(report.problems), len(report.broken_shards),
             len(report.leftovers), len(report.rerun_uris), report.seconds)
    return report


def _writer_active(out: Path) -> bool:
    """Whether a process holds OUT's write lock (probed with a non-blocking shared flock, released at once)."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def _check_run_json(out: Path, report: VerifyReport) -> None:
    path = out / RUN_JSON
    if not path.exists():
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.problems.append(Problem(None, RUN_JSON, "record", f"not valid JSON ({exc}); every writer "
                                       f"refuses the dataset until it is moved aside"))
        return
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version is None:
        return
    try:
        major = schema_major(version)
    except ValueError:
        major = None
    if major != SCHEMA_MAJOR:
        raise DatasetError(f"{out} was written with clipmill schema {version}; this clipmill reads schema major "
                           f"{SCHEMA_MAJOR}. Verify it with the clipmill version that wrote it.")


def _read_record(out: Path, path: Path, report: VerifyReport) -> _Shard:
    """Parse one commit record and check what can be checked without its files."""
    rel = f"{COMMITS}/{path.name}"
    shard = _Shard(path.stem, None)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        shard.add(rel, "record", f"cannot read the commit record: {exc.strerror}")
        return shard
    report.record_digests[path.name] = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
        rec = CommitRecord.from_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        shard.add(rel, "record", f"the commit record is not valid JSON ({exc})")
        shard.file_uris = _guess_uris(out, shard.name)
        return shard
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        shard.add(rel, "record", f"the commit record lacks or mangles a field ({type(exc).__name__}: {exc})")
        shard.file_uris = _guess_uris(out, shard.name)
        return shard
    bad = _malformed(rec)
    if bad:
        shard.add(rel, "record", bad)
        shard.file_uris = _guess_uris(out, shard.name)
        return shard
    shard.record = rec
    if rec.shard != shard.name:
        shard.add(rel, "record", f"names shard {rec.shard!r} but is stored as {path.name}")
    try:
        major: int | None = schema_major(rec.schema_version)
    except ValueError:
        major = None
    if major != SCHEMA_MAJOR:
        shard.add(rel, "schema", f"record of schema {rec.schema_version!r}; this clipmill reads major {SCHEMA_MAJOR}")
    if "videos" not in rec.files:
        shard.add(rel, "record", "lists no videos file")
    if len(rec.video_ids) != len(rec.uris):
        shard.add(rel, "record", f"lists {len(rec.video_ids)} video_ids but {len(rec.uris)} uris")
    return shard


def _malformed(rec: CommitRecord) -> str | None:
    """Why a parsed record cannot be trusted at all (wrong types, paths outside OUT), or None."""
    if not isinstance(rec.video_ids, list) or not all(isinstance(v, str) for v in rec.video_ids):
        return "video_ids is not a list of strings"
    if not isinstance(rec.uris, list) or not all(isinstance(u, str) for u in rec.uris):
        return "uris is not a list of strings"
    for table, sf in rec.files.items():
        if table not in TABLES:
            return f"lists an unknown table {table!r}"
        if not (isinstance(sf.path, str) and isinstance(sf.sha256, str) and type(sf.bytes) is int
                and type(sf.rows) is int):
            return f"the entry of {table} has fields of the wrong type"
        parts = Path(sf.path).parts
        if Path(sf.path).is_absolute() or len(parts) != 2 or parts[0] != table or ".." in parts:
            return f"the path of {table} ({sf.path!r}) is not {table}/<file> inside the dataset"
    return None


def _guess_uris(out: Path, shard: str) -> list[str]:
    """Best effort for a record that cannot be parsed: the uri column of the shard's videos file."""
    for name in (f"{shard}.parquet", f".{shard}.parquet.tmp"):
        path = out / "videos" / name
        if path.exists():
            try:
                return [u for u in pq.read_table(path, columns=["uri"])["uri"].to_pylist() if u is not None]
            except (*_PARQUET_ERRORS, KeyError):
                return []
    return []


def _resolve(out: Path, rel: str) -> Path:
    final = out / rel
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    return tmp if tmp.exists() else final


def _check_files(out: Path, shard: _Shard, checksums: bool, report: VerifyReport) -> None:
    """Check each file of a parsed record, then the record's lists against the files' key columns."""
    rec = shard.record
    if rec is None:
        raise ValueError("_check_files needs a parsed record")
    keys: dict[str, pa.Table] = {}
    for table in TABLES:
        if table in rec.files:
            t = _check_file(out, shard, table, checksums, report)
            if t is not None:
                keys[table] = t
    videos, clips = keys.get("videos"), keys.get("clips")
    if videos is not None:
        rel = rec.files["videos"].path
        vids, uris = videos["video_id"].to_pylist(), videos["uri"].to_pylist()
        shard.file_uris = [u for u in uris if u is not None]
        if vids != rec.video_ids:
            shard.add(rel, "record", f"the record's video_ids differ from the file's ({_diff(rec.video_ids, vids)})")
        if uris != rec.uris:
            shard.add(rel, "record", f"the record's uris differ from the file's ({_diff(rec.uris, uris)})")
    dup_uris = _repeated(rec.uris)
    if dup_uris:
        shard.add(f"{COMMITS}/{shard.name}.json", "duplicate",
                  f"{len(dup_uris)} uri(s) appear twice in this shard (e.g. {', '.join(dup_uris[:EXAMPLES])})")
    if clips is not None:
        rel = rec.files["clips"].path
        known = set(videos["video_id"].to_pylist()) if videos is not None else set(rec.video_ids)
        orphans = sorted({v for v in clips["video_id"].to_pylist() if v not in known}, key=str)
        if orphans:
            shard.add(rel, "rows", f"clip rows of {len(orphans)} video(s) not in this shard "
                                   f"(e.g. {', '.join(map(str, orphans[:EXAMPLES]))})")
        ids = clips["clip_id"].to_pylist()
        dup_ids = _repeated(ids)
        if dup_ids:
            shard.add(rel, "duplicate", f"{len(dup_ids)} clip_id(s) appear twice in this shard "
                                        f"(e.g. {', '.join(map(str, dup_ids[:EXAMPLES]))})")
        shard.clip_hashes = np.fromiter((hash(c) for c in ids), dtype=np.int64, count=len(ids))


def _check_file(out: Path, shard: _Shard, table: str, checksums: bool, report: VerifyReport) -> pa.Table | None:
    """Size, checksum, Parquet footer, row count, schema, key columns of one listed file; its keys or None."""
    sf = shard.record.files[table]  # type: ignore[union-attr]
    path = _resolve(out, sf.path)
    report.files += 1
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        shard.add(sf.path, "missing", f"listed in the commit record but not on disk ({sf.rows} {table} row(s))")
        return None
    report.bytes += size
    if size != sf.bytes:
        shard.add(sf.path, "size", f"{size} bytes on disk, {sf.bytes} recorded")
    elif checksums:
        try:
            digest = file_sha256(path)
        except OSError as exc:
            shard.add(sf.path, "unreadable", f"cannot read the file: {exc.strerror}")
            return None
        report.bytes_hashed += size
        if digest != sf.sha256:
            shard.add(sf.path, "checksum", f"sha256 {digest[:12]}... differs from the recorded {sf.sha256[:12]}...")
    try:
        pf = pq.ParquetFile(path)
    except _PARQUET_ERRORS as exc:
        shard.add(sf.path, "unreadable", f"does not open as Parquet ({exc})")
        return None
    n = pf.metadata.num_rows
    if n != sf.rows:
        shard.add(sf.path, "rows", f"{n} rows in the file, {sf.rows} recorded")
    schema_errors = _schema_errors(pf.schema_arrow, table)
    if schema_errors:
        shard.add(sf.path, "schema", "; ".join(schema_errors))
        return None
    try:
        keys = pf.read(columns=list(KEY_COLUMNS[table]))
    except _PARQUET_ERRORS as exc:
        shard.add(sf.path, "unreadable", f"its key columns do not decode ({exc})")
        return None
    report.videos += n if table == "videos" else 0
    report.clips += n if table == "clips" else 0
    return keys


def _schema_errors(schema: pa.Schema, table: str) -> list[str]:
    """Why a file's schema is not one this clipmill reads as `table` (empty when it is)."""
    errors = []
    meta = schema.metadata or {}
    version = meta.get(b"clipmill.schema_version")
    if version is not None:
        try:
            major: int | None = schema_major(version.decode(errors="replace"))
        except ValueError:
            major = None
        if major != SCHEMA_MAJOR:
            errors.append(f"written with schema {version.decode(errors='replace')!r}; this clipmill reads major "
                          f"{SCHEMA_MAJOR}")
    holds = meta.get(b"table")
    if holds is not None and holds.decode(errors="replace") != table:
        errors.append(f"holds table {holds.decode(errors='replace')!r}, listed as {table!r}")
    expected = SCHEMAS[table]
    for f in schema:
        if f.name in expected.names and not f.type.equals(expected.field(f.name).type):
            errors.append(f"column {f.name} is {f.type}, the schema says {expected.field(f.name).type}")
    missing = [c for c in KEY_COLUMNS[table] if c not in schema.names]
    if missing:
        errors.append(f"key column(s) {', '.join(missing)} missing")
    return errors


def _check_cross_shard_duplicates(out: Path, shards: list[_Shard]) -> None:
    """Flag a shard whose clip_id or uri already appears in an earlier shard that is itself not broken.

    Clip ids are compared through 64-bit hashes first (8 bytes per clip in RAM); only the shards that share
    a hash are read again to compare the exact ids, so a hash collision is never reported.
    """
    good = [s for s in shards if not s.problems and s.record is not None]
    candidates = _shared_clip_hashes(good)
    shared = set(candidates.tolist())
    exact: dict[str, list[str]] = {}
    for s in good:
        if candidates.size and s.clip_hashes is not None and np.isin(s.clip_hashes, candidates).any():
            ids = pq.read_table(_resolve(out, s.record.files["clips"].path),  # type: ignore[union-attr]
                                columns=["clip_id"])["clip_id"].to_pylist()
            exact[s.name] = [c for c, h in zip(ids, s.clip_hashes.tolist(), strict=True)
                             if h in shared]
    uri_owner: dict[str, str] = {}
    clip_owner: dict[str, str] = {}
    for s in good:
        rec = s.record
        if rec is None:
            continue
        uris = [(u, uri_owner[u]) for u in rec.uris if u in uri_owner]
        clips = [(c, clip_owner[c]) for c in exact.get(s.name, ()) if c in clip_owner]
        if uris:
            s.add(f"{COMMITS}/{s.name}.json", "duplicate",
                  f"{len(uris)} uri(s) already committed in an earlier shard (e.g. "
                  f"{', '.join(f'{u} in {o}' for u, o in uris[:EXAMPLES])})")
        if clips:
            s.add(rec.files["clips"].path, "duplicate",
                  f"{len(clips)} clip_id(s) already in an earlier shard (e.g. "
                  f"{', '.join(f'{c} in {o}' for c, o in clips[:EXAMPLES])})")
        if uris or clips:
            continue  # a duplicate shard claims nothing: later shards are compared with the good ones only
        uri_owner.update((u, s.name) for u in rec.uris)
        clip_owner.update((c, s.name) for c in exact.get(s.name, ()))


def _shared_clip_hashes(shards: list[_Shard]) -> np.ndarray:
    """Sorted clip-id hashes that occur in more than one of `shards`."""
    hashes = [np.unique(s.clip_hashes) for s in shards if s.clip_hashes is not None and len(s.clip_hashes)]
    if not hashes:
        return np.zeros(0, np.int64)
    h = np.concatenate(hashes)
    h.sort(kind="stable")
    return np.unique(h[1:][h[1:] == h[:-1]])


def _find_leftovers(out: Path, shards: list[_Shard]) -> list[Leftover]:
    """Files no reader uses, in videos/, clips/, _commits/, OUT itself, and _tmp_dedup/."""
    referenced = {sf.path for s in shards if s.record for sf in s.record.files.values()}
    unparsed = {s.name for s in shards if s.record is None}  # their files go with the broken shard
    found: list[Leftover] = []
    for sub in TABLES:
        folder = out / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            rel = f"{sub}/{p.name}"
            if rel in referenced:
                continue
            m = _SHARD_FILE.match(p.name)
            if m and m.group(1) in unparsed:
                continue
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                final = f"{sub}/{p.name[1:-4]}"
                if final in referenced and not (out / final).exists():
                    found.append(Leftover(rel, "pending", f"committed file still under its temporary name; "
                                                          f"repair (or the next writer) renames it to {final}"))
                else:
                    found.append(Leftover(rel, "temp", "temporary file of an interrupted write (never committed)"))
            else:
                found.append(Leftover(rel, "unreferenced", "no commit record lists it (e.g. left by an "
                                                           "interrupted dedup, or its record was removed)"))
    cdir = out / COMMITS
    if cdir.is_dir():
        for p in sorted(cdir.iterdir()):
            if p.match("part-*.json"):
                continue
            rel = f"{COMMITS}/{p.name}"
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                found.append(Leftover(rel, "temp", "temporary commit record of an interrupted write"))
            else:
                found.append(Leftover(rel, "unreferenced", "not a commit record (readers ignore it)"))
    for p in sorted(out.glob(".*.tmp")):
        found.append(Leftover(p.name, "temp", "temporary file of an interrupted write"))
    if (out / TMP_DEDUP).exists():
        found.append(Leftover(TMP_DEDUP, "tmp_dedup", "working folder of an interrupted dedup"))
    return found


def _repeated(values: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    dups: dict[Any, None] = {}
    for v in values:
        if v in seen:
            dups[v] = None
        seen.add(v)
    return list(dups)


def _diff(recorded: list[Any], actual: list[Any]) -> str:
    if len(recorded) != len(actual):
        return f"{len(recorded)} recorded, {len(actual)} in the file"
    for i, (a, b) in enumerate(zip(recorded, actual, strict=True)):
        if a != b:
            return f"first difference at row {i}: recorded {a!r}, file {b!r}"
    return "same values"


def _clip_list(items: list[str], n: int) -> list[str]:
    return items[:n] + ([f"... {len(items) - n} more"] if len(items) > n else [])


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------
# repair
# ---------------------------------------------------------------------------------------------------------

class _WriteLock(ShardWriter):
    """ShardWriter's write lock (same checks, same flock, same refusal of a second writer) WITHOUT its
    recovery step: recovery reads every commit record (which fails on a corrupt one) and deletes data files
    of shards without a record, which repair must move to the quarantine instead."""

    def recover(self) -> None:  # called by ShardWriter.open()
        return None


def repair_dataset(out: str | os.PathLike, report: VerifyReport | None = None) -> RepairReport:
    """Quarantine the broken shards of OUT and clean its leftovers, under OUT's write lock.

    Moves each broken shard's files (data first, commit record last) and every unreferenced file into
    `OUT/_quarantine/<UTC timestamp>/` with a `quarantine.json` saying why; deletes temporaries and
    `_tmp_dedup/`; renames committed files left under their temporary name. Deletes no committed or
    unreferenced data. `report` (from `verify_dataset`) saves a second verify pass when OUT has not
    changed since (same commit records, no writer was active); otherwise OUT is verified again under the
    lock, with the report's checksum setting (checksums on without a report). Idempotent.

    Raises DatasetError when another process writes OUT, when OUT is not a compatible clipmill dataset, or
    when its run.json is damaged (move it aside by hand first; the message says how).
    """
    out = Path(out)
    if not out.is_dir() or not ((out / COMMITS).is_dir() or (out / RUN_JSON).exists()):
        raise DatasetError(f"{out} is not a clipmill dataset (no {COMMITS}/ or {RUN_JSON}); give the OUT of a "
                           f"`clipmill run`")
    if report is not None and Path(report.out).resolve() != out.resolve():
        raise ValueError(f"the report is of {report.out}, not of {out}")
    _refuse_damaged_run_json(out)
    with _WriteLock(out):
        current = report
        if report is None or report.writer_active or _record_digests(out) != report.record_digests:
            if report is not None:
                log.info("repair %s: the dataset changed since it was verified; verifying again", out)
            current = verify_dataset(out, checksums=report.checksums if report is not None else True)
        if current is None:  # unreachable: keeps type checkers honest
            raise ValueError("no verify report")
        result = RepairReport(out=str(out), rerun_uris=list(current.rerun_uris), reverified=current is not report)
        quarantine = _Quarantine(out)
        for shard in current.broken_shards:
            for rel in _shard_paths(out, shard):
                if quarantine.move(rel):
                    result.moved.append(rel)
            result.quarantined_shards.append(shard)
        for left in current.leftovers:
            path = out / left.path
            if left.kind == "unreferenced":
                if quarantine.move(left.path):
                    result.moved.append(left.path)
                    result.unreferenced.append(left.path)
            elif left.kind == "tmp_dedup" and path.is_dir():
                shutil.rmtree(path)
                result.removed.append(left.path)
            elif left.kind == "temp" and path.is_file():
                path.unlink()
                result.removed.append(left.path)
            elif left.kind == "pending" and path.is_file():
                final = path.with_name(path.name[1:-4])
                if not final.exists():
                    os.replace(path, final)
                    fsync_dir(final.parent)
                    result.rolled_forward.append(str(final.relative_to(out)))
        if quarantine.dir is not None:
            result.quarantine_dir = str(quarantine.dir.relative_to(out))
            quarantine.write_manifest(current, result)
    if result.quarantined_shards:
        log.warning("repair %s: moved %d broken shard(s) to %s/%s; re-run the same `clipmill run` to re-process "
                    "%d input(s)", out, len(result.quarantined_shards), out, result.quarantine_dir,
                    len(result.rerun_uris))
    log.info("repair %s: %d shard(s) quarantined, %d file(s) moved, %d removed, %d renamed; %d input(s) to "
             "re-run", out, len(result.quarantined_shards), len(result.moved), len(result.removed),
             len(result.rolled_forward), len(result.rerun_uris))
    return result


def _refuse_damaged_run_json(out: Path) -> None:
    path = out / RUN_JSON
    if not path.exists():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is damaged ({exc}); move it aside by hand (`mv {path} {path}.bad`; the next "
                           f"`clipmill run` writes a new one), then run verify --repair again") from exc


def _record_digests(out: Path) -> dict[str, str]:
    cdir = out / COMMITS
    if not cdir.is_dir():
        return {}
    digests = {}
    for p in sorted(cdir.glob("part-*.json")):
        try:
            digests[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            digests[p.name] = "unreadable"
    return digests


def _shard_paths(out: Path, shard: str) -> list[str]:
    """Every file of `shard` on disk (data files of any revision, temporaries), its commit record last."""
    rels: list[str] = []
    record = out / COMMITS / f"{shard}.json"
    try:
        rec: CommitRecord | None = CommitRecord.from_json(json.loads(record.read_bytes()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError):
        rec = None
    if rec is not None and _malformed(rec) is None:
        for sf in rec.files.values():
            for p in (out / sf.path, (out / sf.path).with_name(f".{Path(sf.path).name}.tmp")):
                if p.is_file():
                    rels.append(str(p.relative_to(out)))
    for sub in TABLES:
        folder = out / sub
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                m = _SHARD_FILE.match(p.name)
                rel = f"{sub}/{p.name}"
                if m and m.group(1) == shard and rel not in rels:
                    rels.append(rel)
    for name in (f".{shard}.json.tmp", f"{shard}.json"):
        if (out / COMMITS / name).exists():
            rels.append(f"{COMMITS}/{name}")
    return rels


class _Quarantine:
    """OUT/_quarantine/<UTC timestamp>/, created on the first move; files keep their relative paths."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir: Path | None = None
        self.created_at = dt.datetime.now(dt.timezone.utc)

    def _ensure(self) -> Path:
        if self.dir is None:
            base = self.out / QUARANTINE / self.created_at.strftime("%Y%m%dT%H%M%SZ")
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            path.mkdir(parents=True)
            self.dir = path
        return self.dir

    def move(self, rel: str) -> bool:
        """Move OUT/rel into the quarantine; False when it is gone already. Never overwrites."""
        src = self.out / rel
        if not src.exists():
            return False
        dst = self._ensure() / rel
        if dst.exists():
            raise DatasetError(f"{dst} exists already; move it away and run repair again")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        fsync_dir(src.parent)
        fsync_dir(dst.parent)
        log.info("repair %s: moved %s to %s", self.out, rel, dst.relative_to(self.out))
        return True

    def write_manifest(self, report: VerifyReport, result: RepairReport) -> None:
        if self.dir is None:
            return
        data = {
            "created_at": self.created_at.isoformat(timespec="seconds"),
            "dataset": str(self.out),
            "why": [asdict(p) for p in report.problems if p.shard in result.quarantined_shards],
            "shards": result.quarantined_shards,
            "moved": result.moved,
            "rerun_uris": result.rerun_uris,
            "restore": "Files keep their paths relative to the dataset. To restore a shard, stop every clipmill "
                       "process on the dataset, move its files back (records last), and run `clipmill verify`. "
                       "A later run may reuse a quarantined shard's number: restore under a new number then.",
        }
        path = self.dir / MANIFEST
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


