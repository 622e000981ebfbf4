"""Subsets of a dataset: pick clips with a SQL WHERE, read them per shard, write them as a new dataset.

`select_clips(OUT, WHERE)` runs `SELECT clip_id, video_id FROM clips WHERE (<WHERE>)` through
`storage/query.py`'s read-only DuckDB (the statement guard refuses anything that is not one read statement;
the connection can read only OUT's committed shards). The WHERE sees the `clips` view's columns and may use
subqueries over `videos`, e.g. `kept AND video_id IN (SELECT video_id FROM videos WHERE fps >= 24)`. The
default WHERE is `kept` (only clips that passed the filter); `true` selects every clip.

`iter_selected(OUT, selection)` then reads OUT's committed shards one at a time (by their commit records,
never a directory listing) and yields, per shard, the selected clip rows and the video rows they belong to.
Memory: the selected clip ids, plus one source shard and its selected rows.

`select_subset(OUT, WHERE, DEST)` materialises the selection as a dataset with the same contract: the
selected clip rows (every column, media included) and the `videos` rows of the videos they come from, with
`n_clips`/`n_kept` recounted over the subset's clips (every other video column is the source's). It writes
through `ShardWriter` (DEST's lock, atomic commits, a video's clips always in its own shard) and records
provenance in DEST/run.json under `subset` (source path, the WHERE, times, counts, the source's run.json
recipe/versions/counts, and the source's own `subset` block when it was itself a subset). The source's
`recipe` is kept as DEST's `recipe`, so DEST reads like the run that produced its rows.

Re-running: DEST must be new or empty. A DEST that is already a subset of the same source with the same
WHERE is resumed (its committed videos are skipped; an interrupted select completes, a finished one adds
what the source has gained since); anything else non-empty is refused.

What `clipmill run` into a subset does: DEST is an ordinary dataset, so a run resumes into it -- inputs
whose uri is already committed in DEST are skipped, any other input is processed with the given recipe and
appended as new shards (all its clips, not filtered by the WHERE). That never rewrites or duplicates the
selected rows, and `subset` in run.json stays; to grow a subset, run into the source and select again.

What it does not do: it does not re-cut, re-encode or re-score anything (clips whose `media` is NULL stay
NULL), does not copy rejected/failed videos that have no selected clip, and takes no lock on OUT (it reads
only committed shards, so a writer may add shards meanwhile; those are not part of the selection).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipmill.storage.schema import CLIPS_SCHEMA, SCHEMA_VERSION, VIDEOS_SCHEMA
from clipmill.storage.shards import (
    COMMITS,
    RUN_JSON,
    CommitRecord,
    DatasetError,
    ShardWriter,
    check_compatible,
    committed_keys,
    iter_commit_counts,
    read_commits,
    read_run_json,
    resolve_file,
    write_json_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_WHERE = "kept"
DEFAULT_SHARD_MB = 256.0
DEFAULT_SHARD_VIDEOS = 64

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "select" with clips done / selected."""


class SelectError(ValueError):
    """A selection cannot be made: not a dataset, a bad WHERE, or a destination that must not be written."""


@dataclass(frozen=True)
class Selection:
    """The clips a WHERE picked in OUT: their ids and the ids of the videos they belong to."""

    out: Path
    where: str
    clip_ids: frozenset[str]
    video_ids: frozenset[str]

    @property
    def n_clips(self) -> int:
        return len(self.clip_ids)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)


@dataclass
class SelectReport:
    """What `select_subset` did."""

    source: str
    dest: str
    where: str
    selected_clips: int = 0
    selected_videos: int = 0
    written_clips: int = 0
    written_videos: int = 0
    skipped_videos: int = 0  # already committed in DEST (a resumed select)
    skipped_clips: int = 0
    shards: int = 0
    media_bytes: int = 0
    clips_without_media: int = 0
    resumed: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: what was written where, how long it took."""
        extra = f", {self.skipped_videos} video(s) already there (resumed)" if self.resumed else ""
        nomedia = f", {self.clips_without_media} without media" if self.clips_without_media else ""
        return (f"selected {self.selected_clips} clip(s) of {self.selected_videos} video(s) from {self.source} "
                f"into {self.dest}: wrote {self.written_clips} clip(s){nomedia}, {self.written_videos} video(s), "
                f"{self.shards} shard(s), {_human(self.media_bytes)} of media in {self.seconds:.1f} s{extra}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_dataset(out: str | os.PathLike) -> Path:
    """OUT as a Path when it is a clipmill dataset of our schema MAJOR; SelectError otherwise."""
    path = Path(out)
    if not path.is_dir():
        raise SelectError(f"{out} is not a directory; give the output directory of a clipmill run")
    if not (path / COMMITS).is_dir() and not (path / RUN_JSON).exists():
        raise SelectError(f"{out} is not a clipmill dataset (no {COMMITS}/ or {RUN_JSON}); give the OUT of a "
                          f"`clipmill run`")
    try:
        check_compatible(path)
    except DatasetError as exc:
        raise SelectError(str(exc)) from exc
    except ValueError as exc:  # a damaged run.json
        raise SelectError(f"{path / RUN_JSON} cannot be read ({exc}); run `clipmill verify {out}`") from exc
    return path


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\nHint:")[0].split())


def select_clips(out: str | os.PathLike, where: str = DEFAULT_WHERE) -> Selection:
    """Run `SELECT clip_id, video_id FROM clips WHERE (<where>)` read-only over OUT; return the ids.

    The WHERE must be one boolean expression over the `clips` view (subqueries over `videos` allowed).
    Raises SelectError with a one-line message for an empty, unparsable, non-boolean or refused WHERE.
    """
    from clipmill.storage.query import QueryError, QueryRefused, check_read_only, connect, execute  # noqa: PLC0415

    path = check_dataset(out)
    where = (where or "").strip()
    if not where:
        raise SelectError('empty --where; give a SQL condition on clips, e.g. "kept", or "true" for every clip')
    sql = f"SELECT clip_id, video_id FROM clips WHERE (\n{where}\n)"
    try:
        con = connect(path)
    except QueryError as exc:
        raise SelectError(_one_line(exc)) from exc
    try:
        statements = check_read_only(con, sql)
        if len(statements) != 1:
            raise SelectError(f"bad --where {where!r}: it must be one condition, not several statements")
        table = execute(con, sql)
    except QueryRefused as exc:
        what = _one_line(exc).split(". Only read statements")[0]
        raise SelectError(f"bad --where {where!r}: it must be one read-only condition on clips ({what})") from exc
    except QueryError as exc:
        raise SelectError(f"bad --where {where!r}: {_one_line(exc)} (columns: clipmill sql OUT \"DESCRIBE clips\")"
                          ) from exc
    finally:
        con.close()
    if table.column_names != ["clip_id", "video_id"]:
        raise SelectError(f"bad --where {where!r}: the selection does not return clip rows")
    clip_ids = frozenset(table["clip_id"].to_pylist())
    video_ids = frozenset(table["video_id"].to_pylist())
    log.info("select %s WHERE %s: %d clip(s) of %d video(s)", path, where, len(clip_ids), len(video_ids))
    return Selection(out=path, where=where, clip_ids=clip_ids, video_ids=video_ids)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` with exactly `schema`'s columns (absent ones as typed NULL), cast to their types."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            col = t[f.name]
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(len(t), f.type))
    return pa.Table.from_arrays(cols, schema=schema)


@dataclass
class ShardRows:
    """The selected rows of one source shard: its video rows (only videos with a selected clip) and clips."""

    shard: str
    videos: pa.Table
    clips: pa.Table


def iter_selected(selection: Selection, *, clip_columns: list[str] | None = None,
                  videos: bool = True) -> Iterator[ShardRows]:
    """Yield the selected rows of each committed shard of `selection.out`, one shard at a time.

    Clip rows come with `clip_columns` (default: every schema column, media included) conformed to the
    schema; `videos=False` skips reading the video rows (an empty videos table is yielded then). Shards with
    no selected clip are skipped after reading only their clip_id column. A clip selected but no longer in
    any committed shard (e.g. quarantined since) is simply not yielded.
    """
    schema = CLIPS_SCHEMA if clip_columns is None else pa.schema([CLIPS_SCHEMA.field(c) for c in clip_columns])
    ids = pa.array(sorted(selection.clip_ids), type=pa.string())
    for rec in read_commits(selection.out):
        rows = _read_shard(selection.out, rec, ids, schema, videos)
        if rows is not None:
            yield rows


def _read_shard(out: Path, rec: CommitRecord, ids: pa.Array, schema: pa.Schema, videos: bool) -> ShardRows | None:
    if "clips" not in rec.files:
        return None
    path = resolve_file(out, rec.files["clips"].path)
    try:
        key = pq.read_table(path, columns=["clip_id"])["clip_id"]
        mask = pc.is_in(key, value_set=ids)
        if not pc.any(mask).as_py():
            return None
        present = set(pq.read_schema(path).names)
        clips = pq.read_table(path, columns=[c for c in schema.names if c in present]).filter(mask)
        clips = _conform(clips, schema)
        vids = VIDEOS_SCHEMA.empty_table()
        if videos and "videos" in rec.files:
            vpath = resolve_file(out, rec.files["videos"].path)
            vt = pq.read_table(vpath, columns=[c for c in VIDEOS_SCHEMA.names if c in pq.read_schema(vpath).names])
            selected_vids = pc.unique(clips["video_id"])
            vids = _conform(vt.filter(pc.is_in(vt["video_id"], value_set=selected_vids)), VIDEOS_SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        raise SelectError(f"cannot read shard {rec.shard} of {out}: {exc}; run `clipmill verify {out}`") from exc
    return ShardRows(rec.shard, vids, clips)


def _recount(videos: pa.Table, clips: pa.Table) -> pa.Table:
    """Video rows with n_clips / n_kept counted over `clips` (the subset's clips)."""
    n_clips: dict[str, int] = {}
    n_kept: dict[str, int] = {}
    for vid, kept in zip(clips["video_id"].to_pylist(), clips["kept"].to_pylist(), strict=True):
        n_clips[vid] = n_clips.get(vid, 0) + 1
        n_kept[vid] = n_kept.get(vid, 0) + (1 if kept else 0)
    vids = videos["video_id"].to_pylist()
    videos = videos.set_column(videos.schema.get_field_index("n_clips"), VIDEOS_SCHEMA.field("n_clips"),
                               pa.array([n_clips.get(v, 0) for v in vids], pa.int32()))
    return videos.set_column(videos.schema.get_field_index("n_kept"), VIDEOS_SCHEMA.field("n_kept"),
                             pa.array([n_kept.get(v, 0) for v in vids], pa.int32()))


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _has_content(p: Path) -> bool:
    if p.name == ".lock":
        return False
    if p.name in ("videos", "clips", COMMITS) and p.is_dir():
        return any(p.iterdir())
    return True


def _check_dest(source: Path, dest: Path, where: str) -> dict[str, Any] | None:
    """The existing subset block of DEST when it may be resumed; None when DEST is new/empty; else refuse."""
    src, dst = source.resolve(), dest.resolve()
    if dst == src or src in dst.parents:
        raise SelectError(f"the subset {dest} cannot be inside the source dataset {source}; choose another -o")
    if dest.exists() and not dest.is_dir():
        raise SelectError(f"{dest} exists and is not a directory; choose a new -o directory")
    if not dest.is_dir() or not any(_has_content(p) for p in dest.iterdir()):
        return None  # new, empty, or only the empty folders of a writer that stopped before writing run.json
    meta = None
    try:
        meta = read_run_json(dest)
    except ValueError:
        pass
    sub = (meta or {}).get("subset") if isinstance(meta, dict) else None
    if isinstance(sub, dict) and sub.get("source") == str(src) and sub.get("where") == where:
        return sub
    if isinstance(sub, dict):
        raise SelectError(f"{dest} is already a subset (of {sub.get('source')} WHERE {sub.get('where')!r}); "
                          f"it is resumed only with the same source and --where. Choose a new -o directory")
    raise SelectError(f"{dest} is not empty; choose a new -o directory (or remove it first)")


def select_subset(out: str | os.PathLike, where: str, dest: str | os.PathLike, *,
                  shard_mb: float = DEFAULT_SHARD_MB, shard_videos: int = DEFAULT_SHARD_VIDEOS,
                  progress: Progress | None = None) -> SelectReport:
    """Write the clips of OUT matching WHERE (and their videos' rows) as a new dataset DEST.

    Shards are committed after `shard_videos` videos or `shard_mb` MB of media, whichever comes first.
    Resumes a DEST that is a subset of the same OUT and WHERE; refuses any other non-empty DEST. Raises
    SelectError (user errors) or DatasetError (DEST locked or unwritable). See the module docstring.
    """
    t0 = time.monotonic()
    source = check_dataset(out)
    dest = Path(dest)
    prior = _check_dest(source, dest, (where or "").strip())
    selection = select_clips(source, where)
    report = SelectReport(source=str(source.resolve()), dest=str(dest), where=selection.where,
                          selected_clips=selection.n_clips, selected_videos=selection.n_videos,
                          resumed=prior is not None)
    src_meta = read_run_json(source) or {}
    limit = int(shard_mb * 2**20)
    with ShardWriter(dest) as writer:
        _, done_vids = committed_keys(dest)
        meta = _subset_run_json(dest, source, selection, src_meta, prior)
        pending_v: list[pa.Table] = []
        pending_c: list[pa.Table] = []
        state = {"videos": 0, "bytes": 0}

        def flush() -> None:
            if not pending_v:
                return
            videos, clips = pa.concat_tables(pending_v), pa.concat_tables(pending_c)
            writer.commit(videos, clips)
            report.shards += 1
            report.written_videos += len(videos)
            report.written_clips += len(clips)
            pending_v.clear()
            pending_c.clear()
            state.update(videos=0, bytes=0)
            _update_run_json(dest, meta, report, finished=False)

        done = 0
        if progress:
            progress("select", 0, selection.n_clips)
        for rows in iter_selected(selection):
            done += len(rows.clips)
            vids = rows.videos["video_id"].to_pylist()
            fresh = [v for v in vids if v not in done_vids]
            report.skipped_videos += len(vids) - len(fresh)
            if fresh:
                keep = pa.array(fresh, pa.string())
                clips = rows.clips.filter(pc.is_in(rows.clips["video_id"], value_set=keep))
                report.skipped_clips += len(rows.clips) - len(clips)
                videos = _recount(rows.videos.filter(pc.is_in(rows.videos["video_id"], value_set=keep)), clips)
                sizes = pc.binary_length(clips["media"])
                media = int(pc.sum(sizes).as_py() or 0)
                report.media_bytes += media
                report.clips_without_media += clips["media"].null_count
                pending_v.append(videos)
                pending_c.append(clips)
                state["videos"] += len(videos)
                state["bytes"] += media
                if state["videos"] >= shard_videos or state["bytes"] >= limit:
                    flush()
            else:
                report.skipped_clips += len(rows.clips)
            if progress:
                progress("select", done, selection.n_clips)
        flush()
        report.seconds = time.monotonic() - t0
        _update_run_json(dest, meta, report, finished=True)
    lost = selection.n_clips - report.written_clips - report.skipped_clips
    if lost > 0:
        log.warning("select: %d selected clip(s) were no longer committed in %s when read", lost, source)
    log.info("%s", report.summary())
    return report


def _subset_run_json(dest: Path, source: Path, selection: Selection, src_meta: dict[str, Any],
                     prior: dict[str, Any] | None) -> dict[str, Any]:
    meta = read_run_json(dest) if prior is not None else None
    if not isinstance(meta, dict):
        meta = {"schema_version": SCHEMA_VERSION, "created_at": _now(), "runs": [],
                "recipe": src_meta.get("recipe"), "versions": src_meta.get("versions")}
    meta.setdefault("runs", [])
    source_run = {k: src_meta.get(k) for k in ("schema_version", "created_at", "updated_at", "recipe", "versions",
                                               "counts") if k in src_meta}
    if isinstance(src_meta.get("subset"), dict):
        source_run["subset"] = src_meta["subset"]
    sub = dict(prior or {})
    sub.update(source=str(source.resolve()), where=selection.where, tool="clipmill select",
               selected_clips=selection.n_clips, selected_videos=selection.n_videos, source_run=source_run,
               started_at=_now(), finished_at=None)
    sub.setdefault("first_started_at", sub["started_at"])
    meta["subset"] = sub
    meta["schema_version"] = SCHEMA_VERSION
    write_json_atomic(dest / RUN_JSON, meta)
    return meta


def _update_run_json(dest: Path, meta: dict[str, Any], report: SelectReport, *, finished: bool) -> None:
    meta["updated_at"] = _now()
    meta["counts"] = iter_commit_counts(read_commits(dest))
    meta["subset"]["last"] = {k: v for k, v in report.to_json().items() if k not in ("source", "dest", "where")}
    if finished:
        meta["subset"]["finished_at"] = _now()
    write_json_atomic(dest / RUN_JSON, meta)


__all__ = [
    "DEFAULT_WHERE", "SelectError", "SelectReport", "Selection", "ShardRows", "check_dataset", "iter_selected",
    "select_clips", "select_subset",
]

