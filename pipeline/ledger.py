"""Turn the work rows that come out of the stages into per-video results: one ledger row + its clip rows.

Rows of one video may arrive in several batches and in any order; `Assembler` holds them until the
video is complete (all `n_clips` clip rows, or its single no-clip row), then hands it out as a
`VideoResult` ready for the shard writer. A video with an error in any row is ledgered `failed` with
that error and none of its clips are written; a rejected one keeps the probe's reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clipmill.storage.schema import CLIP_COLUMNS, STATUS_DONE, STATUS_FAILED, STATUS_REJECTED, aspect_bucket

MEDIA_POLICIES = ("kept", "all", "none")


@dataclass
class VideoResult:
    """A finished video: its ledger row and its clip rows (already in the storage schema's names)."""

    video: dict[str, Any]
    clips: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def media_bytes(self) -> int:
        return sum(len(c.get("media") or b"") for c in self.clips)


def _has_clip(r: dict[str, Any]) -> bool:
    return r.get("clip_index") is not None and r["clip_index"] >= 0


def _first_error(rows: list[dict[str, Any]]) -> str | None:
    errs = sorted((r.get("clip_index") if _has_clip(r) else -1, r["error"]) for r in rows if r.get("error"))
    return errs[0][1] if errs else None


def video_result(rows: list[dict[str, Any]], media: str = "kept", thumbnails: bool = True) -> VideoResult:
    """Build the ledger row and clip rows of one video from all its work rows."""
    first = rows[0]
    error = _first_error(rows)
    status = first.get("status") or STATUS_DONE
    reason = first.get("reason")
    if status != STATUS_REJECTED and error:
        status, reason = STATUS_FAILED, error
    clip_rows = sorted((r for r in rows if _has_clip(r)), key=lambda r: r["clip_index"])
    if status != STATUS_DONE:
        clip_rows = []
    now = dt.datetime.now(dt.timezone.utc)
    clips = [_clip_row(r, media, thumbnails) for r in clip_rows]
    video = {k: first.get(k) for k in (
        "video_id", "uri", "size_bytes", "container", "codec", "pix_fmt", "duration_s", "fps", "width",
        "height", "rotation", "n_frames", "has_audio", "source_caption", "detector", "cuts", "transitions",
        "skipped_spans",
    )}
    if not video.get("video_id"):  # probe never got to hash the content: an id from the uri keeps it ledgered
        video["video_id"] = "uri-" + hashlib.blake2b(str(video["uri"]).encode("utf-8", "surrogateescape"),
                                                     digest_size=8).hexdigest()
    video.update(status=status, reason=reason, n_clips=len(clips), n_kept=sum(1 for c in clips if c["kept"]),
                 committed_at=now)
    spent: dict[str, float] = {}
    for r in rows:
        for k, v in json.loads(r.get("_timings") or "{}").items():
            spent[k] = spent.get(k, 0.0) + v
    return VideoResult(video, clips, spent)


def _clip_row(r: dict[str, Any], media: str, thumbnails: bool) -> dict[str, Any]:
    kept = r.get("kept")
    kept = True if kept is None else bool(kept)
    n_frames = r.get("clip_n_frames") or (r["end_frame"] - r["start_frame"])
    duration = r.get("clip_duration_s") or (r["end_s"] - r["start_s"])
    width, height = r.get("clip_width") or r.get("width"), r.get("clip_height") or r.get("height")
    keep_media = media == "all" or (media == "kept" and kept)
    row = {name: r.get(name) for name in CLIP_COLUMNS}  # every score a stage added, by schema name
    row.update(
        n_frames=n_frames, duration_s=duration, width=width, height=height,
        aspect_bucket=aspect_bucket(width or 0, height or 0), kept=kept,
        reject_reasons=list(r.get("reject_reasons") or []),
        thumbnail=r.get("thumbnail") if thumbnails else None,
        media=r.get("media") if keep_media else None,
    )
    return row


@dataclass
class Assembler:
    """Collects work rows per video and yields each video once all its rows have arrived."""

    media: str = "kept"
    thumbnails: bool = True
    _pending: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    duplicate_rows: int = 0  # rows of videos already completed (a retried task delivering its output again)

    def add(self, rows: Iterable[dict[str, Any]]) -> list[VideoResult]:
        """Add work rows; return the videos they completed. Each video is completed once: rows of a video that
        was already completed are counted in `duplicate_rows` and ignored, so it is never ledgered twice."""
        done = []
        for r in rows:
            key = r["uri"]
            if key in self._done:
                self.duplicate_rows += 1
                continue
            bucket = self._pending.setdefault(key, [])
            bucket.append(r)
            if self._complete(bucket):
                self._done.add(key)
                done.append(video_result(self._pending.pop(key), self.media, self.thumbnails))
        return done

    @staticmethod
    def _complete(rows: list[dict[str, Any]]) -> bool:
        if not all(_has_clip(r) for r in rows):
            return True
        n = rows[0].get("n_clips") or 0
        return len({r["clip_index"] for r in rows}) >= n

    @property
    def incomplete(self) -> list[str]:
        """URIs of videos with some but not all rows received."""
        return list(self._pending)
