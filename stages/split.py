"""split: shot boundaries of a video, then clips of [min_s, max_s] (fan-out: one video row -> clip rows).

Reads the video once through `clipmill.stages.shots.detect_shots` (the same code `clipmill detect` runs),
removes the frames of gradual transitions, cuts at hard cuts, trims `trim_frames` frames on each side of
every boundary, windows long shots and drops short ones. Dropped spans are recorded in `skipped_spans`
with a reason (too_short, transition, trim is not recorded). Writes the video columns `cuts`,
`transitions`, `detector`, `n_frames` (exact decoded count), `n_clips`, `skipped_spans`, and per clip
`clip_index`, `clip_id`, `start_frame`/`end_frame` (half-open), `start_s`/`end_s`, `start_pts`/`end_pts`
and `time_base` (so later stages can seek frame-exactly, also in variable-frame-rate files).
It does not cut media; transcode does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import pyarrow as pa
from pydantic import Field, model_validator

from clipmill.stages.base import RowStage, StageConfig
from clipmill.storage import remote
from clipmill.storage.ids import clip_id
from clipmill.storage.schema import SPAN


class SplitConfig(StageConfig):
    """Config of the split stage.

    Args:
        detector: shot detector ("default" is clipmill's hybrid detector; see `clipmill detect --help`).
        min_s: shorter shots (after trimming) are dropped, recorded as skipped with reason too_short.
        max_s: longer shots are windowed into clips of at most this length.
        trim_frames: frames dropped on each side of every cut and transition (decoder/encoder smear).
        long_shots: "even" splits a long shot into equal clips <= max_s; "fixed" cuts max_s windows and
            drops a remainder shorter than min_s.
        max_clips_per_video: stop after this many clips of one video (0 = no limit).
    """

    detector: str = "default"
    min_s: float = Field(2.0, ge=0.0)
    max_s: float = Field(10.0, gt=0.0)
    trim_frames: int = Field(2, ge=0, le=100)
    long_shots: Literal["even", "fixed"] = "even"
    max_clips_per_video: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        from clipmill.stages.shots import DETECTORS  # noqa: PLC0415

        if self.max_s < self.min_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= min_s ({self.min_s})")
        if self.detector not in DETECTORS:
            raise ValueError(f"detector {self.detector!r} unknown; allowed: {', '.join(DETECTORS)}")
        return self


@dataclass(frozen=True)
class Span:
    """A half-open frame span [start, end)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def shot_spans(n_frames: int, cuts: list[int], transitions: list[tuple[int, int]], trim: int) -> tuple[
        list[Span], list[dict[str, Any]]]:
    """Shots between boundaries, trimmed; returns (shots, skipped) with transitions recorded as skipped."""
    skipped: list[dict[str, Any]] = []
    # Every boundary is an interval of frames that belongs to no shot: a cut is an empty interval at c.
    bounds: list[tuple[int, int]] = [(c, c) for c in cuts if 0 < c < n_frames]
    for first, last in transitions:
        first, last = max(0, int(first)), min(n_frames - 1, int(last))
        if last >= first:
            bounds.append((first, last + 1))
            skipped.append({"first": first, "last": last, "reason": "transition"})
    bounds.sort()
    shots: list[Span] = []
    pos, at_start = 0, True
    for b0, b1 in bounds + [(n_frames, n_frames)]:
        start = pos + (0 if at_start else trim)
        end = b0 - (trim if b0 < n_frames else 0)
        if end > start:
            shots.append(Span(start, end))
        pos, at_start = max(pos, b1), False
    return shots, skipped


def window(shot: Span, min_len: int, max_len: int, mode: str) -> tuple[list[Span], list[Span]]:
    """Split one shot into clips of [min_len, max_len] frames; returns (clips, too_short_leftovers)."""
    if shot.length < max(min_len, 1):
        return [], [shot]
    if shot.length <= max_len:
        return [shot], []
    if mode == "even":
        n = math.ceil(shot.length / max_len)
        size = shot.length // n
        if size >= min_len:
            starts = [shot.start + i * size for i in range(n)]
            clips = [Span(s, s + size) for s in starts]
            rest = Span(clips[-1].end, shot.end)
            return clips, ([rest] if rest.length else [])
    clips, s = [], shot.start
    while shot.end - s >= max_len:
        clips.append(Span(s, s + max_len))
        s += max_len
    rest = Span(s, shot.end)
    if rest.length >= min_len and rest.length > 0:
        clips.append(rest)
        return clips, []
    return clips, ([rest] if rest.length else [])


class Split(RowStage):
    """Detect shots in one video and fan it out into clip rows (see the module docstring)."""

    name = "split"
    Config = SplitConfig
    level = "fanout"
    reads = ("uri", "video_id")
    adds = {
        "n_frames": pa.int64(),
        "fps": pa.float64(),
        "detector": pa.string(),
        "cuts": pa.list_(pa.int64()),
        "transitions": pa.list_(pa.list_(pa.int64())),
        "skipped_spans": pa.list_(SPAN),
        "n_clips": pa.int32(),
        "clip_index": pa.int32(),
        "clip_id": pa.string(),
        "start_frame": pa.int64(),
        "end_frame": pa.int64(),
        "start_s": pa.float64(),
        "end_s": pa.float64(),
        "start_pts": pa.int64(),
        "end_pts": pa.int64(),
        "time_base": pa.string(),
    }
    num_cpus = 1.0

    cfg: SplitConfig

    def process(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from clipmill.stages.shots import detect_shots  # noqa: PLC0415 - heavy import, once per worker

        uri = row["uri"]
        if remote.is_remote(uri):  # read through fsspec's block cache; PyAV takes the file object
            with remote.opened(uri) as f:
                shots = detect_shots(f, self.cfg.detector)
        else:
            shots = detect_shots(_local_path(uri), self.cfg.detector)
        n, fps = int(shots.n_frames), float(shots.fps)
        if n <= 0 or not fps > 0:
            raise ValueError(f"no decodable video frames (n_frames={n}, fps={fps})")
        spans, skipped = shot_spans(n, list(shots.cuts), list(shots.transitions), self.cfg.trim_frames)
        min_len = max(1, math.ceil(self.cfg.min_s * fps - 1e-6))
        max_len = max(min_len, math.floor(self.cfg.max_s * fps + 1e-6))
        clips: list[Span] = []
        for shot in spans:
            got, short = window(shot, min_len, max_len, self.cfg.long_shots)
            clips += got
            skipped += [{"first": s.start, "last": s.end - 1, "reason": "too_short"} for s in short]
        limit = self.cfg.max_clips_per_video
        if limit and len(clips) > limit:
            skipped += [{"first": s.start, "last": s.end - 1, "reason": "max_clips_per_video"}
                        for s in clips[limit:]]
            clips = clips[:limit]
        skipped.sort(key=lambda s: s["first"])
        pts = shots.pts
        base = dict(
            row, n_frames=n, fps=fps, detector=shots.detector, cuts=[int(c) for c in shots.cuts],
            transitions=[[int(a), int(b)] for a, b in shots.transitions], skipped_spans=skipped,
            n_clips=len(clips), time_base=f"{shots.time_base.numerator}/{shots.time_base.denominator}",
        )
        if not clips:
            return [dict(base, clip_index=-1)]
        video_id = row["video_id"]
        out = []
        for i, c in enumerate(clips):
            out.append(dict(
                base, clip_index=i, clip_id=clip_id(video_id, c.start, c.end),
                start_frame=c.start, end_frame=c.end, start_s=c.start / fps, end_s=c.end / fps,
                start_pts=_pts_at(pts, c.start), end_pts=_pts_at(pts, c.end),
            ))
        return out


def _local_path(uri: str) -> str:
    """Local path of a plain path or `file://` URL (percent-escapes decoded, as the probe stage does)."""
    if not uri.startswith("file:"):
        return uri
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL with a remote host is not supported: {uri!r}")
    return unquote(parsed.path, errors="surrogateescape")


def _pts_at(pts: Any, i: int) -> int | None:
    if i >= len(pts):
        return None
    v = int(pts[i])
    return v if v >= 0 else None
