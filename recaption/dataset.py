"""Re-caption an existing dataset (`clipmill caption OUT`): new captions/prompts, same media, atomic shard rewrites.

For every committed clip shard that holds selected clips: decode the selected clips' frames from the MP4 bytes
stored in the shard (or, when the recipe did not keep media, from the source video's frame span), caption them
(and expand the captions unless told not to), then rewrite the shard with the text columns replaced and every
other column, media bytes included, copied unchanged (storage/dedup.py's `rewrite_clip_columns`: new file,
then the commit-record switch, then the old file deleted). Holds OUT's write lock throughout.

Selection: kept clips (`--all-clips`: every clip) matching the optional SQL `where` (DuckDB, over the `clips`
view). Clips already captioned without error by the same model are skipped unless `redo`, which makes an
interrupted run resumable: the shards it finished are not captioned again. This module is the one place in
recaption that uses stages (frame decoding, the caption frame set) and storage internals; it is driven by the CLI.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.recaption.core import CaptionSettings, ExpandSettings, caption_clips, expand_clips
from clipmill.recaption.facts import METADATA_MODEL
from clipmill.recaption.textgen import one_line
from clipmill.stages.base import FrameSpec

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "caption_model", "caption_error", "dominant_colors")
PROMPT_COLUMNS = ("prompt_short", "prompt_long", "prompt_model", "prompt_error")

Progress = Callable[[int, int], None]


@dataclass
class RecaptionReport:
    """What a re-caption did: clips selected/captioned/failed, shards rewritten, seconds."""

    selected: int = 0
    skipped_done: int = 0
    captioned: int = 0
    caption_errors: int = 0
    prompt_errors: int = 0
    shards_rewritten: int = 0
    shards: int = 0
    caption_model: str = ""
    prompt_model: str | None = None
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self), seconds=round(self.seconds, 3))


def target_model(s: CaptionSettings) -> str:
    """The caption_model value this configuration writes."""
    return METADATA_MODEL if s.builtin else str(s.model)


def frames_from_source(uri: str, start_frame: int, end_frame: int, spec: FrameSpec) -> list[np.ndarray]:
    """Frames of frame set `spec` for source frames [start_frame, end_frame) of a local video (decode order)."""
    import av  # noqa: PLC0415

    from clipmill.stages.frames import _fit, set_indices  # noqa: PLC0415

    path = uri[7:] if uri.startswith("file://") else uri
    with av.open(path, mode="r", metadata_errors="ignore") as c:
        if not c.streams.video:
            raise ValueError(f"{uri} has no video stream")
        vs = c.streams.video[0]
        fps = float(vs.average_rate or 0)
        want = {start_frame + i for i in set_indices(end_frame - start_frame, fps, spec)}
        out = []
        for i, frame in enumerate(c.decode(vs)):
            if i in want:
                w, h = _fit(frame.width, frame.height, spec.max_side)
                out.append(frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA"))
            if i >= max(want):
                break
    if len(out) != len(want):
        raise ValueError(f"{uri}: decoded {len(out)} of {len(want)} frames of span [{start_frame}, {end_frame})")
    return out


def clip_frames(row: dict[str, Any], spec: FrameSpec) -> list[np.ndarray]:
    """The clip's frames of set `spec`: from its stored MP4 bytes, else from its source span."""
    from clipmill.stages.frames import decode_sets  # noqa: PLC0415

    if row.get("media"):
        sets, _ = decode_sets(row["media"], [spec], 32)
        return list(sets[spec.name])
    if row.get("uri") and row.get("start_frame") is not None and row.get("end_frame") is not None:
        return frames_from_source(row["uri"], int(row["start_frame"]), int(row["end_frame"]), spec)
    raise ValueError("the clip has neither media bytes nor a source span to decode")


def _select(out: Path, where: str | None, all_clips: bool) -> set[str] | None:
    """clip_ids matching `where` (and kept unless all_clips); None = every clip (no SQL needed)."""
    conds = [] if all_clips else ["kept IS NOT FALSE"]
    if where:
        conds.append(f"({where})")
    if not conds:
        return None
    from clipmill.storage.query import run_query  # noqa: PLC0415

    sql = f"SELECT clip_id FROM clips WHERE {' AND '.join(conds)}"
    return set(run_query(out, sql)["clip_id"].to_pylist())


def _done(row: dict[str, Any], model: str) -> bool:
    return bool(row.get("caption")) and not row.get("caption_error") and row.get("caption_model") == model


def recaption_dataset(out: str | os.PathLike, caption: CaptionSettings, expand: ExpandSettings | None = None, *,
                      where: str | None = None, all_clips: bool = False, redo: bool = False,
                      frame_set: FrameSpec | None = None, progress: Progress | None = None) -> RecaptionReport:
    """Caption (and expand, when `expand` is given) the selected clips of dataset OUT; see the module docstring.

    Raises DatasetError when OUT is not a clipmill dataset or another process writes it, and
    storage.query.QueryError for a bad `where`. Per-clip failures (decoding, the model) are recorded in
    `caption_error` and counted in the report, never raised.
    """
    from clipmill.stages.caption import FRAME_SET  # noqa: PLC0415
    from clipmill.storage.dedup import remove_rewrite_leftovers, rewrite_clip_columns  # noqa: PLC0415
    from clipmill.storage.shards import (  # noqa: PLC0415
        COMMITS,
        RUN_JSON,
        DatasetError,
        ShardWriter,
        read_commits,
        read_run_json,
        write_json_atomic,
    )

    t0 = time.monotonic()
    out = Path(out)
    if not (out / COMMITS).is_dir():
        raise DatasetError(f"{out} is not a clipmill dataset (no {COMMITS}/); give the OUT of a `clipmill run`")
    spec = frame_set or FRAME_SET
    model = target_model(caption)
    report = RecaptionReport(caption_model=model, prompt_model=None if expand is None else (
        "clipmill/template" if expand.builtin else str(expand.model)))
    with ShardWriter(out):
        records = [r for r in read_commits(out) if "clips" in r.files]
        remove_rewrite_leftovers(out, records)
        chosen = _select(out, where, all_clips)
        plan: list[tuple[Any, list[int]]] = []
        for rec in records:
            path = out / rec.files["clips"].path
            names = pq.read_schema(path).names
            cols = [c for c in ("clip_id", "caption", "caption_model", "caption_error") if c in names]
            meta = pq.read_table(path, columns=cols).to_pylist()
            idx = [i for i, r in enumerate(meta) if chosen is None or r["clip_id"] in chosen]
            report.selected += len(idx)
            todo = [i for i in idx if redo or not _done(meta[i], model)]
            report.skipped_done += len(idx) - len(todo)
            if todo:
                plan.append((rec, todo))
        report.shards = len(records)
        total = sum(len(t) for _, t in plan)
        done = 0
        if progress:
            progress(0, total)
        for rec, todo in plan:
            path = out / rec.files["clips"].path
            table = pq.read_table(path)
            texts = {c: (table[c].to_pylist() if c in table.column_names else [None] * table.num_rows)
                     for c in (*CAPTION_COLUMNS, *(PROMPT_COLUMNS if expand is not None else ()))}
            light = table.drop_columns([c for c in ("media", "thumbnail", "embedding") if c in table.column_names])
            for s in range(0, len(todo), caption.batch_size):
                batch = todo[s:s + caption.batch_size]
                rows = [light.slice(i, 1).to_pylist()[0] for i in batch]
                medias = table["media"].take(pa.array(batch)).to_pylist() if "media" in table.column_names \
                    else [None] * len(batch)
                good, pairs = [], []
                for k, (i, row, media) in enumerate(zip(batch, rows, medias, strict=True)):
                    try:
                        pairs.append((row, clip_frames(dict(row, media=media), spec)))
                        good.append(k)
                    except Exception as exc:  # noqa: BLE001 - a clip that cannot be decoded is an error row
                        err = f"decode failed: {one_line(f'{type(exc).__name__}: {exc}')}"
                        texts["caption"][i], texts["caption_model"][i] = None, model
                        texts["caption_error"][i] = err
                        report.caption_errors += 1
                        report.errors["decode failed"] = report.errors.get("decode failed", 0) + 1
                results = caption_clips(pairs, caption) if pairs else []
                for k, res in zip(good, results, strict=True):
                    i = batch[k]
                    texts["caption"][i], texts["caption_model"][i] = res.caption, res.model
                    texts["caption_error"][i], texts["dominant_colors"][i] = res.error, res.colours or None
                    rows[k].update(caption=res.caption, dominant_colors=res.colours)
                    if res.error:
                        report.caption_errors += 1
                        key = res.error.split(":", 1)[0]
                        report.errors[key] = report.errors.get(key, 0) + 1
                    else:
                        report.captioned += 1
                if expand is not None:
                    for k, res in enumerate(expand_clips(rows, expand)):
                        i = batch[k]
                        vals = (None, None, None, None) if res is None else (res.short, res.long, res.model, res.error)
                        for c, v in zip(PROMPT_COLUMNS, vals, strict=True):
                            texts[c][i] = v
                        report.prompt_errors += int(res is not None and res.error is not None)
                done += len(batch)
                if progress:
                    progress(done, total)
            from clipmill.storage.schema import CLIPS_SCHEMA  # noqa: PLC0415

            rewrite_clip_columns(out, rec, {c: pa.array(v, CLIPS_SCHEMA.field(c).type) for c, v in texts.items()},
                                 command=f"clipmill caption {out}")
            report.shards_rewritten += 1
        report.seconds = time.monotonic() - t0
        meta_json = read_run_json(out) or {}
        meta_json.setdefault("recaptions", []).append({
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "where": where,
            "all_clips": all_clips, "redo": redo, "caption": caption.model_dump(mode="json"),
            "expand": expand.model_dump(mode="json") if expand is not None else None, "report": report.to_json()})
        write_json_atomic(out / RUN_JSON, meta_json)
    log.info("caption %s: %s", out, report.to_json())
    return report
