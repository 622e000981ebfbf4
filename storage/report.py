"""A self-contained HTML report of a dataset: funnel, rejects, score histograms, gallery, timings.

`build_report(out)` returns one HTML page that needs no network to open: CSS and JavaScript are inline,
plots are inline SVG drawn here, thumbnails are `data:` JPEG URIs, and the sampled clips' MP4 bytes sit in
the page as base64 text that the page turns into a Blob URL when a clip is hovered or clicked.

What the page shows: totals and the funnel (inputs -> readable -> clips -> kept, counts and hours); inputs
dropped by reason; clip rejects by reason; a histogram of every score (kept and dropped stacked) with the
recipe's `min_*` / `max_*` thresholds drawn on it; a gallery of sampled kept clips (thumbnail, plays on
hover/click, caption, prompts, OCR text, scores); a sample of dropped clips for each reject reason;
duration, aspect, resolution, fps and camera-motion distributions; the recipe's thresholds; each run's
stage seconds, and the last run's per-stage throughput and queue depths (run.json `metrics`). run.json
may be missing or malformed: what cannot be read is left out.

Large datasets: every count and histogram is aggregated by DuckDB over the committed shards (the views of
`storage/query.py`): one pass copies the small columns (scores, flags, reasons, each clip's file and row)
into in-memory temp tables, and every aggregate runs there; Python only ever holds the sampled rows. The
samples are deterministic (md5 order) and drawn by row group, so their thumbnails and video are read, with
pyarrow, from a few row groups instead of the whole media column; the page's size does not grow with the
dataset. Memory: the small columns of every clip (about 150 bytes a clip), plus the sampled rows. Size bound: at most
`gallery + per_reason * max_reasons` thumbnails (240 by default), and embedded MP4 bytes capped at
`max_media_mb` (40 MB by default, 4/3 of that as base64); clips beyond the cap or over `max_clip_mb`
show their thumbnail only, and the page says so.

Dataset text is hostile: file names, URIs, OCR text, captions, prompts and reasons are HTML-escaped
everywhere (text and attributes), nothing from the dataset is placed inside a script, and a
Content-Security-Policy admits only this page's own script and style (by hash), `data:`/`blob:` images and
media, and no network at all -- so even a missed escape could not run a script or fetch anything.

This module imports nothing of clipmill outside `storage`.
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import hashlib
import html
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from clipmill.storage.query import QueryError, connect
from clipmill.storage.shards import committed_files, read_run_json
from clipmill.storage.stats import SCORES

log = logging.getLogger(__name__)

_TEMPLATE = Path(__file__).with_name("report_template.html")

# Score columns shown in the card of a clip.
_CARD_SCORES = ("sharpness", "brisque", "exposure", "motion_score", "text_area", "nsfw_score", "aesthetic_score",
                "brightness", "contrast")
# Columns fetched for the sampled clips (never for all clips).
_SAMPLE_COLUMNS = ("clip_id", "video_id", "uri", "start_s", "end_s", "duration_s", "width", "height", "fps",
                   "aspect_bucket", "camera_motion", "kept", "reject_reasons", "duplicate_of", "ocr_text",
                   "source_caption", "caption", "caption_model", "prompt_short", "prompt_long", "prompt_model",
                   "thumbnail") + _CARD_SCORES


class ReportError(RuntimeError):
    """The report could not be built: OUT is not a readable clipmill dataset, or the output cannot be written."""


@dataclass(frozen=True)
class ReportConfig:
    """What goes into the page and how big it may get.

    Args:
        gallery: kept clips sampled into the gallery.
        per_reason: dropped clips sampled for each reject reason.
        max_reasons: reject reasons that get a sample (the most frequent first; all are counted).
        max_media_mb: cap on the MP4 bytes embedded in the page (base64 adds a third on top).
        max_clip_mb: a clip bigger than this is shown as a thumbnail only.
        bins: bars per score histogram.
    """

    gallery: int = 48
    per_reason: int = 8
    max_reasons: int = 24
    max_media_mb: float = 40.0
    max_clip_mb: float = 8.0
    bins: int = 30

    def __post_init__(self) -> None:
        for name in ("gallery", "per_reason", "max_reasons"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_media_mb < 0 or self.max_clip_mb < 0:
            raise ValueError(f"max_media_mb and max_clip_mb must be >= 0, got {self.max_media_mb}, {self.max_clip_mb}")
        if not 2 <= self.bins <= 200:
            raise ValueError(f"bins must be in 2..200, got {self.bins}")


@dataclass
class ReportSummary:
    """What was written: sizes and counts, for the CLI's last line and for benchmarks."""

    path: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    clips: int = 0
    kept: int = 0
    gallery: int = 0
    reject_samples: int = 0
    media_embedded: int = 0
    media_bytes: int = 0
    media_skipped: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


# ----------------------------------------------------------------------------------------------- helpers


def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute (& < > " ' all escaped)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    av = abs(v)
    if av != 0 and (av >= 1e7 or av < 1e-3):
        return f"{v:.{digits - 1}e}"
    whole = len(str(int(av))) if av >= 1 else 0
    return f"{v:.{max(digits, whole)}g}"


def _hours(seconds: float | None) -> str:
    s = float(seconds or 0.0)
    if s < 3600:
        return f"{s / 3600:.3g} h ({s / 60:.1f} min)" if s >= 60 else f"{s / 3600:.2g} h ({s:.1f} s)"
    return f"{s / 3600:,.1f} h"


def _pct(n: float, total: float) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "–"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# ------------------------------------------------------------------------------------------------ SVG plots

_W, _H = 360, 150          # histogram size
_PAD_L, _PAD_B, _PAD_T = 44, 30, 20
_KEPT, _DROPPED, _THRESH = "#2f8f5b", "#b9bec7", "#d1333d"


def svg_histogram(bins: Sequence[dict[str, Any]], thresholds: Sequence[tuple[str, float]], *,
                  label: str, lo: float, hi: float) -> str:
    """Stacked (kept, dropped) histogram as an SVG string, with threshold lines; bins need lo, hi, kept, dropped.

    A threshold outside [lo, hi] is drawn as an arrow at the edge it lies beyond.
    """
    plot_w, plot_h = _W - _PAD_L - 8, _H - _PAD_B - _PAD_T
    peak = max((b["kept"] + b["dropped"] for b in bins), default=0) or 1
    span = (hi - lo) or 1.0

    def _tick(v: float) -> str:  # an axis label: values within 1e-4 of a span from 0 read 0
        return _num(0.0 if abs(v) < span * 1e-4 else v, 3)

    def x(v: float) -> float:
        return _PAD_L + (v - lo) / span * plot_w

    parts = [f'<svg class="plot hist" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
             f'aria-label="{esc(label)}">']
    parts.append(f'<line class="axis" x1="{_PAD_L}" y1="{_PAD_T + plot_h}" x2="{_PAD_L + plot_w}" '
                 f'y2="{_PAD_T + plot_h}"/>')
    for b in bins:
        x0, x1 = x(b["lo"]), x(b["hi"])
        w = max(x1 - x0 - 1, 0.8)
        y = _PAD_T + plot_h
        for key, colour in (("dropped", _DROPPED), ("kept", _KEPT)):
            n = b[key]
            if not n:
                continue
            h = max(n / peak * plot_h, 1.0)
            y -= h
            parts.append(
                f'<rect class="bar {key}" x="{x0:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}">'
                f'<title>{esc(_tick(b["lo"]))} – {esc(_tick(b["hi"]))}: {b["kept"]:,} kept, {b["dropped"]:,} dropped'
                f'</title></rect>'
            )
    base = _PAD_T + plot_h
    parts.append(f'<text class="tick" x="{_PAD_L}" y="{base + 13}" text-anchor="start">{esc(_tick(lo))}</text>')
    parts.append(f'<text class="tick" x="{_PAD_L + plot_w}" y="{base + 13}" text-anchor="end">{esc(_tick(hi))}</text>')
    parts.append(f'<text class="tick" x="{_PAD_L + plot_w / 2}" y="{base + 13}" text-anchor="middle">'
                 f'{esc(_tick((lo + hi) / 2))}</text>')
    parts.append(f'<text class="tick" x="{_PAD_L - 4}" y="{_PAD_T + 4}" text-anchor="end">{peak:,}</text>')
    parts.append(f'<text class="tick" x="{_PAD_L - 4}" y="{base}" text-anchor="end">0</text>')
    for i, (name, v) in enumerate(thresholds):
        ty = _PAD_T - 6 + (i % 2) * 10 if len(thresholds) > 1 else _PAD_T - 6
        if lo <= v <= hi:
            tx = x(v)
            anchor = "start" if tx < _PAD_L + plot_w * 0.7 else "end"
            dx = 3 if anchor == "start" else -3
            parts.append(f'<line class="threshold" x1="{tx:.1f}" y1="{_PAD_T - 2}" x2="{tx:.1f}" y2="{base}" '
                         f'stroke="{_THRESH}"><title>{esc(name)} = {esc(_tick(v))}</title></line>')
            parts.append(f'<text class="thr" x="{tx + dx:.1f}" y="{ty + 16}" text-anchor="{anchor}">'
                         f'{esc(name)} {esc(_tick(v))}</text>')
        else:
            right = v > hi
            tx = _PAD_L + plot_w if right else _PAD_L
            arrow = "→" if right else "←"
            anchor = "end" if right else "start"
            parts.append(f'<text class="thr offscale" x="{tx:.1f}" y="{ty + 16}" text-anchor="{anchor}">'
                         f'{esc(name)} {esc(_tick(v))} {arrow}<title>threshold off the plotted range</title></text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: Sequence[tuple[str, float, str]], *, label: str, unit: str = "", width: int = 560,
             colour: str = "#4a6fa5") -> str:
    """Horizontal bar chart as SVG: one (name, value, value text) per row, longest bar = largest value."""
    row_h, label_w, text_w = 20, 190, 130
    height = row_h * max(len(items), 1) + 6
    peak = max((v for _, v, _ in items), default=0) or 1
    bar_w = width - label_w - text_w
    parts = [f'<svg class="plot bars" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(label)}">']
    for i, (name, v, text) in enumerate(items):
        y = 3 + i * row_h
        w = max(v / peak * bar_w, 1.0 if v > 0 else 0.0)
        short = name if len(name) <= 28 else name[:27] + "…"
        parts.append(f'<text class="lab" x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(short)}'
                     f'<title>{esc(name)}</title></text>')
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" '
                     f'fill="{colour}"><title>{esc(name)}: {esc(text)}{esc(unit)}</title></rect>')
        parts.append(f'<text class="val" x="{label_w + w + 5:.1f}" y="{y + 14}">{esc(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the data


def _filter_params(recipe: dict[str, Any] | None) -> dict[str, Any]:
    """The filter stage's parameters from a run.json recipe ({} when there is none)."""
    return _stage_params(recipe, "filter")


def _stage_params(recipe: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Parameters of the recipe's stage `name` ({} when absent or malformed)."""
    stages = (recipe or {}).get("stages")
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, dict) and isinstance(stage.get(name), dict):
            return stage[name]
    return {}


def thresholds_for(column: str, params: dict[str, Any]) -> list[tuple[str, float]]:
    """[(label, value)] of the recipe's min_/max_ thresholds on `column` that are set."""
    out = []
    for kind in ("min", "max"):
        v = params.get(f"{kind}_{column}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((kind, float(v)))
    return out


def _histogram(con: duckdb.DuckDBPyConnection, column: str, thresholds: Sequence[tuple[str, float]],
               bins: int) -> dict[str, Any] | None:
    """Kept/dropped histogram of a numeric column, computed in DuckDB; None when it has no finite values.

    The plotted range is [min, max] unless outliers would squash the plot (then the 0.5-99.5 percentile range,
    with values beyond it counted in the edge bins); it is widened to take in thresholds lying near it.
    """
    col = _ident(column)
    row = con.execute(
        f"SELECT count(x), min(x), max(x), quantile_cont(x, 0.005), quantile_cont(x, 0.995), "
        f"count(x) FILTER (WHERE k) FROM (SELECT CAST({col} AS DOUBLE) AS x, coalesce(kept, false) AS k "
        f"FROM _light) WHERE x IS NOT NULL AND isfinite(x)"
    ).fetchone()
    n, vmin, vmax, q_lo, q_hi, n_kept = row
    if not n:
        return None
    lo, hi = float(vmin), float(vmax)
    clipped = False
    if q_hi > q_lo and (hi - lo) > 3 * (q_hi - q_lo):
        lo, hi, clipped = float(q_lo), float(q_hi), True
    span = hi - lo
    for _, t in thresholds:
        reach = max(span, abs(t) * 1e-6, 1e-9) * 0.35
        if hi < t <= hi + reach:
            hi = t + 0.04 * (t - lo)
        elif lo - reach <= t < lo:
            lo = t - 0.04 * (hi - t)
    if hi <= lo:  # one value only: widen to take in the thresholds, else pad around it (not below 0 for >= 0 data)
        values = [lo] + [t for _, t in thresholds]
        lo, hi = min(values), max(values)
        pad = 0.1 * (hi - lo) if hi > lo else max(abs(lo) * 0.5, 0.5)
        lo, hi = lo - pad, hi + pad
        if vmin >= 0 > lo:
            lo = 0.0 if vmin > 0 or hi - vmin > pad else -pad / 5
    width = (hi - lo) / bins
    rows = con.execute(
        f"SELECT least(greatest(CAST(floor((x - $lo) / $w) AS BIGINT), 0), $last) AS b, "
        f"count(*) FILTER (WHERE k) AS kept, count(*) FILTER (WHERE NOT k) AS dropped "
        f"FROM (SELECT CAST({col} AS DOUBLE) AS x, coalesce(kept, false) AS k FROM _light) "
        f"WHERE x IS NOT NULL AND isfinite(x) GROUP BY b",
        {"lo": lo, "w": width, "last": bins - 1},
    ).fetchall()
    got = {int(b): (int(k), int(d)) for b, k, d in rows}
    out_bins = [{"lo": lo + i * width, "hi": lo + (i + 1) * width, "kept": got.get(i, (0, 0))[0],
                 "dropped": got.get(i, (0, 0))[1]} for i in range(bins)]
    return {"count": int(n), "kept": int(n_kept), "min": float(vmin), "max": float(vmax), "lo": lo, "hi": hi,
            "clipped": clipped, "bins": out_bins}


def _pairs(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    return con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()


@dataclass
class _Figures:
    funnel: dict[str, Any]
    by_status: list[tuple[str, int]]
    input_reasons: list[tuple[str, str, int, list[str]]]
    reasons: list[tuple[str, int]]
    histograms: dict[str, dict[str, Any]]
    duration: dict[str, Any] | None
    flags: list[tuple[str, int, int]]
    categories: dict[str, list[tuple[str, int]]]


def _figures(con: duckdb.DuckDBPyConnection, params: dict[str, Any], split: dict[str, Any], bins: int) -> _Figures:
    v_total, v_s, done, done_s = con.execute(
        "SELECT count(*), coalesce(sum(duration_s), 0), count(*) FILTER (WHERE status = 'done'), "
        "coalesce(sum(duration_s) FILTER (WHERE status = 'done'), 0) FROM videos"
    ).fetchone()
    c_total, c_s, kept, kept_s = con.execute(
        "SELECT count(*), coalesce(sum(duration_s), 0), count(*) FILTER (WHERE kept), "
        "coalesce(sum(duration_s) FILTER (WHERE kept), 0) FROM _light"
    ).fetchone()
    funnel = {"inputs": (int(v_total), float(v_s)), "readable": (int(done), float(done_s)),
              "clips": (int(c_total), float(c_s)), "kept": (int(kept), float(kept_s))}
    by_status = [(str(s), int(n)) for s, n in _pairs(
        con, "SELECT status, count(*) AS n FROM videos GROUP BY status ORDER BY n DESC, status")]
    input_reasons = [
        (str(s), "unknown" if r is None else str(r), int(n), [str(u) for u in (ex or [])])
        for s, r, n, ex in _pairs(
            con, "SELECT status, trim(split_part(reason, ':', 1)) AS r, count(*) AS n, "
                 "list(uri ORDER BY md5(video_id))[1:5] FROM videos WHERE status <> 'done' "
                 "GROUP BY status, r ORDER BY n DESC, status, r")
    ]
    reasons = [(str(r), int(n)) for r, n in _pairs(
        con, "SELECT r, count(*) AS n FROM (SELECT unnest(reject_reasons) AS r FROM _light) GROUP BY r "
             "ORDER BY n DESC, r")]
    hists = {}
    for score in SCORES:
        h = _histogram(con, score, thresholds_for(score, params), bins)
        if h is not None:
            h["thresholds"] = thresholds_for(score, params)
            hists[score] = h
    dur_thr = thresholds_for("duration_s", params)
    for key in ("min_s", "max_s"):
        v = split.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            dur_thr.append((f"split {key}", float(v)))
    duration = _histogram(con, "duration_s", dur_thr, bins)
    if duration is not None:
        duration["thresholds"] = dur_thr
    flags = [(name, int(a), int(b)) for name, a, b in _pairs(
        con, "SELECT 'static', count(*) FILTER (WHERE static), count(static) FROM _light UNION ALL "
             "SELECT 'slideshow', count(*) FILTER (WHERE slideshow), count(slideshow) FROM _light UNION ALL "
             "SELECT 'near-duplicate', count(duplicate_of), count(*) FROM _light")]
    cats = {
        "aspect bucket": "SELECT coalesce(aspect_bucket, 'unknown') AS k, count(*) AS n FROM _light GROUP BY k",
        "resolution": "SELECT CASE WHEN width IS NULL OR height IS NULL THEN 'unknown' ELSE width || 'x' || height "
                      "END AS k, count(*) AS n FROM _light GROUP BY k",
        "frame rate": "SELECT CASE WHEN fps IS NULL THEN 'unknown' ELSE CAST(round(fps, 2) AS VARCHAR) || ' fps' "
                      "END AS k, count(*) AS n FROM _light GROUP BY k",
        "camera motion": "SELECT camera_motion AS k, count(*) AS n FROM _light WHERE camera_motion IS NOT NULL "
                         "GROUP BY k",
        "input codec": "SELECT coalesce(codec, 'unknown') AS k, count(*) AS n FROM videos GROUP BY k",
    }
    categories = {}
    for name, sql in cats.items():
        rows = _pairs(con, f"SELECT k, n FROM ({sql}) ORDER BY n DESC, k LIMIT 13")
        total = con.execute(f"SELECT count(*), coalesce(sum(n), 0) FROM ({sql})").fetchone()
        items = [(str(k), int(n)) for k, n in rows[:12]]
        if total[0] > 12:
            items.append((f"{total[0] - 12} others", int(total[1]) - sum(n for _, n in items)))
        categories[name] = items
    return _Figures(funnel, by_status, input_reasons, reasons, hists, duration, flags, categories)


_LIGHT_COLUMNS = ("clip_id", "kept", "reject_reasons", "duration_s", "width", "height", "fps", "aspect_bucket",
                  "camera_motion", "static", "slideshow", "duplicate_of") + SCORES
_PER_BLOCK = 6  # sampled clips taken from one row group at most (see _sample_ids)


def _load_light(con: duckdb.DuckDBPyConnection, clip_files: Sequence[Path]) -> int:
    """Copy the small columns of all clips into in-memory temp tables: `_light` (scores, flags, reasons) and
    `_loc` (each clip's file and row number). One pass over the shards; every later aggregate runs in memory.
    Returns the typical row-group size of the shards (rows)."""
    con.execute(f"CREATE TEMP TABLE _light AS SELECT {', '.join(_ident(c) for c in _LIGHT_COLUMNS)} FROM clips")
    if clip_files:
        paths = ", ".join("'" + str(p).replace("'", "''") + "'" for p in clip_files)
        con.execute(f"CREATE TEMP TABLE _loc AS SELECT clip_id, filename AS path, parse_filename(filename) AS f, "
                    f"file_row_number AS r FROM read_parquet([{paths}], filename = true, file_row_number = true)")
        groups = [pq.ParquetFile(p).metadata for p in clip_files[:4]]
        sizes = [m.row_group(i).num_rows for m in groups for i in range(m.num_row_groups)]
        return max(sizes, default=256) or 256
    con.execute("CREATE TEMP TABLE _loc (clip_id VARCHAR, path VARCHAR, f VARCHAR, r BIGINT)")
    return 256


def _sample_ids(con: duckdb.DuckDBPyConnection, cfg: ReportConfig, reasons: list[tuple[str, int]], block: int
                ) -> tuple[list[str], dict[str, list[str]]]:
    """Deterministic samples: kept clip ids, and dropped clip ids per sampled reason.

    Clips are drawn by row group: row groups in the order of md5(file name, group number), the first
    _PER_BLOCK clips (in md5(clip_id) order) of each, then the next _PER_BLOCK of each, and so on. Spread over
    the dataset, yet a sample of 48 from a large dataset touches about 8 row groups, so fetching its
    thumbnails and video reads a few column chunks instead of the whole media column.
    """
    base = (f"SELECT l.clip_id, l.kept, l.reject_reasons, md5(o.f || ':' || CAST(o.r // {int(block)} AS VARCHAR)) AS blk, "
            f"o.f, o.r // {int(block)} AS g FROM _light l JOIN _loc o USING (clip_id)")
    kept: list[str] = []
    if cfg.gallery:
        kept = [r[0] for r in _pairs(
            con, f"SELECT clip_id FROM (SELECT clip_id, blk, row_number() OVER (PARTITION BY f, g ORDER BY "
                 f"md5(clip_id), clip_id) AS i FROM ({base}) WHERE kept) "
                 f"ORDER BY (i - 1) // {_PER_BLOCK}, blk, i LIMIT $n", {"n": cfg.gallery})]
    wanted = [r for r, _ in reasons[: cfg.max_reasons]]
    per: dict[str, list[str]] = {r: [] for r in wanted}
    if wanted and cfg.per_reason:
        rows = _pairs(
            con, f"SELECT r, clip_id FROM (SELECT *, row_number() OVER (PARTITION BY r ORDER BY "
                 f"(i - 1) // {_PER_BLOCK}, blk, i) AS j "
                 f"FROM (SELECT r, clip_id, blk, row_number() OVER (PARTITION BY r, f, g ORDER BY md5(clip_id), "
                 f"clip_id) AS i FROM (SELECT *, unnest(reject_reasons) AS r FROM ({base})) "
                 f"WHERE list_contains($wanted, r))) WHERE j <= $k ORDER BY r, j",
            {"wanted": wanted, "k": cfg.per_reason})
        for r, cid in rows:
            per[str(r)].append(str(cid))
    return kept, per


def _fetch_rows(con: duckdb.DuckDBPyConnection, ids: Iterable[str], cfg: ReportConfig) -> dict[str, dict[str, Any]]:
    """The sampled clips' display columns, thumbnail and media (when under max_clip_mb), keyed by clip_id.

    Reads only the row groups that hold a sampled clip, straight from the committed files (pyarrow), one row
    group at a time; `media_bytes` is the stored video's size, `media` is dropped when it is over the cap.
    """
    ids = sorted(set(ids))
    if not ids:
        return {}
    locs = con.execute("SELECT clip_id, path, r FROM _loc WHERE clip_id IN (SELECT unnest($ids)) ORDER BY path, r",
                       {"ids": ids}).fetchall()
    by_file: dict[str, list[tuple[str, int]]] = {}
    for cid, path, r in locs:
        by_file.setdefault(str(path), []).append((str(cid), int(r)))
    per_clip = cfg.max_clip_mb * 2**20
    wanted = _SAMPLE_COLUMNS + ("media",)
    out: dict[str, dict[str, Any]] = {}
    for path, rows in by_file.items():
        pf = pq.ParquetFile(path)
        starts = [0]
        for i in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
        names = [c for c in wanted if c in pf.schema_arrow.names]
        by_group: dict[int, list[tuple[str, int]]] = {}
        for cid, r in rows:
            by_group.setdefault(bisect.bisect_right(starts, r) - 1, []).append((cid, r))
        for group, members in by_group.items():
            table = pf.read_row_group(group, columns=names)
            for cid, r in members:
                row = {c: table.column(c)[r - starts[group]].as_py() for c in names}
                if row.get("clip_id") != cid:
                    log.warning("%s: row %d is not clip %s; skipped from the report sample", path, r, cid)
                    continue
                for c in wanted:
                    row.setdefault(c, None)
                media = row.pop("media")
                row["media_bytes"] = len(media) if media is not None else 0
                row["media"] = media if media is not None and len(media) <= per_clip else None
                out[cid] = row
            del table
    return out


# ------------------------------------------------------------------------------------------------ HTML parts


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are inserted as given (callers escape)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _funnel_html(f: _Figures) -> str:
    steps = [("inputs", "inputs"), ("readable", "readable inputs"), ("clips", "clips"), ("kept", "kept clips")]
    first_n, first_s = f.funnel["inputs"]
    cards = []
    for key, name in steps:
        n, s = f.funnel[key]
        cards.append(f'<div class="stat" id="funnel-{key}"><div class="big">{n:,}</div><div>{esc(name)}</div>'
                     f'<div class="sub">{esc(_hours(s))}</div></div>')
    items = []
    for key, name in steps:
        n, s = f.funnel[key]
        items.append((f"{name} (hours)", s / 3600.0, f"{s / 3600:.3g} h · {n:,}"))
    c_n, c_s = f.funnel["clips"]
    k_n, k_s = f.funnel["kept"]
    lines = [
        f"{f.funnel['readable'][0]:,} of {first_n:,} inputs readable ({_pct(f.funnel['readable'][0], first_n)})",
        f"{k_n:,} of {c_n:,} clips kept ({_pct(k_n, c_n)}), {_pct(k_s, c_s)} of clip hours",
        f"kept clip hours are {_pct(k_s, first_s)} of input hours" if first_s else "",
    ]
    summary = "".join(f"<li>{esc(x)}</li>" for x in lines if x)
    return (f'<div class="stats">{"".join(cards)}</div>'
            f'{svg_bars(items, label="funnel in hours", colour="#2f6f9f")}<ul class="facts">{summary}</ul>')


def _rejects_html(f: _Figures) -> str:
    parts = []
    total_clips = f.funnel["clips"][0]
    if f.by_status:
        parts.append("<h3>Inputs by status</h3>")
        parts.append(svg_bars([(s, n, f"{n:,} ({_pct(n, f.funnel['inputs'][0])})") for s, n in f.by_status],
                              label="inputs by status", colour="#6b7a8f"))
    if f.input_reasons:
        parts.append("<h3>Inputs dropped, by reason</h3>")
        rows = [(esc(s), f'<span class="reason">{esc(r)}</span>', f"{n:,}",
                 "<br>".join(f'<span class="uri">{esc(u)}</span>' for u in ex)) for s, r, n, ex in f.input_reasons]
        parts.append(_table(["status", "reason", "inputs", "examples"], rows, "reasons"))
    parts.append("<h3>Clips dropped, by reason</h3>")
    if f.reasons:
        parts.append('<p class="note">A clip can fail several thresholds; each reason is counted.</p>')
        parts.append(svg_bars([(r, n, f"{n:,} ({_pct(n, total_clips)})") for r, n in f.reasons[:40]],
                              label="clip reject reasons", colour="#b4544c"))
        if len(f.reasons) > 40:
            parts.append(f'<p class="note">{len(f.reasons) - 40} rarer reasons not drawn.</p>')
    else:
        parts.append('<p class="empty">No clip was dropped.</p>')
    return "".join(parts)


def _hist_card(title: str, h: dict[str, Any]) -> str:
    thr = h.get("thresholds") or []
    note = []
    if h["clipped"]:
        note.append(f"plotted range is the 0.5–99.5 percentile; min {_num(h['min'])}, max {_num(h['max'])} "
                    f"are in the edge bins")
    thr_text = ", ".join(f"{name} {_num(v)}" for name, v in thr) or "no threshold"
    svg = svg_histogram(h["bins"], thr, label=f"histogram of {title}", lo=h["lo"], hi=h["hi"])
    extra = f'<div class="note">{esc("; ".join(note))}</div>' if note else ""
    return (f'<figure class="hist-card" data-score="{esc(title)}"><figcaption><b>{esc(title)}</b> '
            f'<span class="sub">n={h["count"]:,} · kept {h["kept"]:,} · {esc(thr_text)}</span></figcaption>'
            f'{svg}{extra}</figure>')


def _scores_html(f: _Figures) -> str:
    if not f.histograms:
        return '<p class="empty">No clip has a score yet.</p>'
    legend = ('<p class="legend"><span class="sw kept"></span>kept <span class="sw dropped"></span>dropped '
              '<span class="sw thr"></span>recipe threshold</p>')
    cards = "".join(_hist_card(name, h) for name, h in f.histograms.items())
    flags = _table(["flag", "clips with it", "clips measured"],
                   [(esc(n), f"{a:,}", f"{b:,}") for n, a, b in f.flags], "flags")
    return f'{legend}<div class="hist-grid">{cards}</div><h3>Flags</h3>{flags}'


def _distributions_html(f: _Figures) -> str:
    parts = []
    if f.duration is not None:
        parts.append(f'<div class="hist-grid">{_hist_card("duration_s", f.duration)}</div>')
    grid = []
    for name, items in f.categories.items():
        if not items:
            continue
        total = sum(n for _, n in items)
        grid.append(f'<figure class="cat"><figcaption><b>{esc(name)}</b></figcaption>'
                    f'{svg_bars([(k, n, f"{n:,} ({_pct(n, total)})") for k, n in items], label=name, width=460)}'
                    f'</figure>')
    parts.append(f'<div class="cat-grid">{"".join(grid)}</div>')
    return "".join(parts)


def _recipe_html(meta: dict[str, Any] | None, params: dict[str, Any]) -> str:
    recipe = (meta or {}).get("recipe")
    recipe = recipe if isinstance(recipe, dict) else {}
    parts = []
    if recipe:
        parts.append(f'<p><b>{esc(recipe.get("name", "?"))}</b> <span class="sub">'
                     f'{esc(recipe.get("source", ""))}</span></p>')
        if recipe.get("description"):
            parts.append(f'<p class="desc">{esc(recipe["description"])}</p>')
        stage_list = recipe.get("stages") if isinstance(recipe.get("stages"), list) else []
        stages = [next(iter(s)) for s in stage_list if isinstance(s, dict) and s]
        if stages:
            parts.append(f'<p>stages: {esc(" → ".join(str(s) for s in stages))}</p>')
    if params:
        rows = [(esc(k), esc(v)) for k, v in sorted(params.items()) if v is not None]
        off = sorted(k for k, v in params.items() if v is None)
        parts.append(_table(["filter parameter", "value"], rows, "params"))
        if off:
            parts.append(f'<p class="note">off: {esc(", ".join(off))}</p>')
    if not parts:
        return '<p class="empty">run.json holds no recipe.</p>'
    return "".join(parts)


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={{{_fmt_value(x)}}}" if isinstance(x, dict) else f"{k}={_fmt_value(x)}"
                         for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _num(v)
    return str(v)


def _timings_html(meta: dict[str, Any] | None) -> str:
    runs = [r for r in ((meta or {}).get("runs") or []) if isinstance(r, dict)]
    if not runs:
        return '<p class="empty">run.json records no run.</p>'
    rows = []
    stage_total: dict[str, float] = {}
    video_s_total = 0.0
    for i, r in enumerate(runs, 1):
        prog = r.get("progress") if isinstance(r.get("progress"), dict) else {}
        elapsed, vs = prog.get("elapsed_s"), prog.get("video_seconds")
        speed = (f"{vs / elapsed:.3g}× realtime" if isinstance(vs, (int, float)) and isinstance(elapsed, (int, float))
                 and elapsed > 0 else "–")
        argv = r.get("argv")
        rows.append((str(i), esc(r.get("started_at", "–")), esc(r.get("finished_at") or "not finished"),
                     f'<code>{esc(" ".join(str(a) for a in argv) if isinstance(argv, list) else argv or "")}</code>',
                     esc(_num(prog.get("videos"))), esc(_num(prog.get("clips"))), esc(_num(prog.get("kept"))),
                     esc(_num(elapsed)), esc(_num(vs)), esc(speed)))
        secs = prog.get("stage_seconds")
        if isinstance(secs, dict):
            for k, v in secs.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    stage_total[str(k)] = stage_total.get(str(k), 0.0) + float(v)
        if isinstance(vs, (int, float)):
            video_s_total += float(vs)
    parts = [_table(["run", "started", "finished", "command", "videos", "clips", "kept", "wall s", "video s", "speed"],
                    rows, "runs")]
    if stage_total:
        total = sum(stage_total.values()) or 1.0
        items = sorted(stage_total.items(), key=lambda kv: -kv[1])
        parts.append("<h3>Seconds per stage (all runs, summed over workers)</h3>")
        parts.append(svg_bars([(k, v, f"{v:,.2f} s ({_pct(v, total)})") for k, v in items],
                              label="seconds per stage", colour="#7a5ea8"))
    # Every other per-stage figure of the last run that recorded one (throughput, queue depth, ...).
    last = next((r["progress"] for r in reversed(runs) if isinstance(r.get("progress"), dict)), {})
    stages = set(stage_total)
    extra = {k: v for k, v in last.items()
             if k != "stage_seconds" and isinstance(v, dict) and v and (set(v) & stages or k.startswith("stage"))}
    names = sorted(stage_total, key=lambda k: -stage_total[k]) + sorted(
        {s for v in extra.values() for s in v} - stages)
    if names:
        head = ["stage", "seconds", "ms per video-second"] + [esc(k) for k in extra]
        body = []
        for s in names:
            sec = stage_total.get(s)
            per = (sec / video_s_total * 1000.0) if sec is not None and video_s_total > 0 else None
            body.append([esc(s), esc(_num(sec)), esc(_num(per))] + [esc(_fmt_value(v.get(s, "–"))) for v in extra.values()])
        parts.append(_table(head, body, "stages"))
    other = {k: v for k, v in last.items() if isinstance(v, (dict, list)) and v and k not in extra
             and k != "stage_seconds"}
    metrics = next((r["metrics"] for r in reversed(runs) if isinstance(r.get("metrics"), dict)), {})
    if metrics:
        parts.append(_metrics_html(metrics))
    glob = next((r["global_steps"] for r in reversed(runs) if isinstance(r.get("global_steps"), dict)), {})
    if glob:
        parts.append("<h3>Whole-dataset steps of the last run</h3>")
        parts.append(_table(["step", "figures"], [(esc(k), esc(_fmt_value(v))) for k, v in glob.items()], "global"))
    if other:
        parts.append("<h3>Other figures of the last run</h3>")
        parts.append(_table(["figure", "value"], [(esc(k), esc(_fmt_value(v))) for k, v in other.items()], "other"))
    return "".join(parts)


_PALETTE = ("#2f6f9f", "#d1733d", "#2f8f5b", "#8c4fb0", "#c2415b", "#6b7a8f", "#b59a1f", "#1f9aa5", "#7a5ea8",
            "#e0609a", "#4a8f2f", "#9f5b2f")


def svg_lines(t: Sequence[float], series: Sequence[tuple[str, Sequence[float]]], *, label: str,
              width: int = 560, height: int = 190) -> str:
    """Line chart as SVG: one polyline per (name, values) over the shared x values `t`, with a legend."""
    pad_l, pad_r, pad_t, pad_b = 44, 120, 10, 26
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    series = [(n, [float(v) if isinstance(v, (int, float)) else 0.0 for v in vals][: len(t)]) for n, vals in series]
    peak = max((max(v, default=0.0) for _, v in series), default=0.0) or 1.0
    t0, t1 = (float(t[0]), float(t[-1])) if t else (0.0, 1.0)
    span = (t1 - t0) or 1.0
    parts = [f'<svg class="plot lines" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(label)}">',
             f'<line class="axis" x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{esc(_num(peak, 3))}</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end">0</text>',
             f'<text class="tick" x="{pad_l}" y="{height - 8}">{esc(_num(t0, 3))} s</text>',
             f'<text class="tick" x="{pad_l + plot_w}" y="{height - 8}" text-anchor="end">{esc(_num(t1, 3))} s</text>']
    for i, (name, vals) in enumerate(series):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = " ".join(f"{pad_l + (float(x) - t0) / span * plot_w:.1f},{pad_t + plot_h - v / peak * plot_h:.1f}"
                       for x, v in zip(t, vals, strict=False))
        parts.append(f'<polyline class="series" points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6">'
                     f'<title>{esc(name)}: max {esc(_num(max(vals, default=0.0), 3))}</title></polyline>')
        ly = pad_t + 10 + i * 13
        parts.append(f'<rect x="{width - pad_r + 8}" y="{ly - 8}" width="10" height="3" fill="{colour}"/>'
                     f'<text class="lab" x="{width - pad_r + 22}" y="{ly - 4}">{esc(name[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _metrics_html(metrics: dict[str, Any]) -> str:
    """Per-stage throughput and queue depths of the last run (run.json `metrics`), whatever keys are present."""
    stages = metrics.get("stages") if isinstance(metrics.get("stages"), dict) else {}
    given = metrics.get("stage_order") if isinstance(metrics.get("stage_order"), list) else []
    order = [s for s in given if isinstance(s, str) and s in stages]
    order += sorted(str(s) for s in stages if s not in order)
    parts = []
    if order:
        cols = [("busy_s", "busy s"), ("rows_in", "rows in"), ("rows_out", "rows out"),
                ("rows_per_busy_s", "rows / busy s"), ("video_s_per_busy_s", "video s / busy s"),
                ("video_s_per_wall_s", "video s / wall s"), ("waiting_rows_max", "waiting max"),
                ("waiting_rows_mean", "waiting mean"), ("running_rows_max", "running max"),
                ("running_rows_mean", "running mean")]
        body = []
        for s in order:
            m = stages[s] if isinstance(stages[s], dict) else {}
            nodes = m.get("nodes")
            body.append([esc(s)] + [esc(_num(m.get(k))) for k, _ in cols]
                        + [esc(_fmt_value(nodes) if isinstance(nodes, dict) else "–")])
        parts.append("<h3>Throughput per stage (last run)</h3>")
        parts.append('<p class="note">busy s: seconds inside the stage summed over workers; video s / busy s: '
                     'seconds of source video per busy second; waiting/running: rows queued for and inside the '
                     'stage.</p>')
        parts.append(_table(["stage"] + [esc(h) for _, h in cols] + ["nodes"], body, "metrics"))
    queue = metrics.get("queue") if isinstance(metrics.get("queue"), dict) else {}
    t = queue.get("t_s")
    if isinstance(t, list) and len(t) >= 2 and all(isinstance(x, (int, float)) for x in t):
        videos = [(name.replace("_", " "), queue[key]) for key, name in
                  (("videos_in_ray", "videos in Ray"), ("videos_awaiting_commit", "awaiting commit"))
                  if isinstance(queue.get(key), list)]
        waiting = queue.get("stage_waiting_rows") if isinstance(queue.get("stage_waiting_rows"), dict) else {}
        waiting_series = [(s, waiting[s]) for s in order if isinstance(waiting.get(s), list)]
        charts = []
        if videos:
            charts.append(f'<figure><figcaption><b>videos in flight</b></figcaption>'
                          f'{svg_lines(t, videos, label="videos in flight over time")}</figure>')
        if waiting_series:
            charts.append(f'<figure><figcaption><b>rows waiting per stage</b></figcaption>'
                          f'{svg_lines(t, waiting_series, label="rows waiting per stage over time")}</figure>')
        if charts:
            parts.append(f'<h3>Queue depth over time (last run)</h3><div class="cat-grid">{"".join(charts)}</div>')
    simple = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if simple:
        parts.append(_table(["figure", "value"], [(esc(k), esc(_fmt_value(v))) for k, v in simple.items()], "other"))
    return "".join(parts)


@dataclass
class _Media:
    """Which sampled clips get their MP4 bytes embedded, under the page's cap."""

    ids: dict[str, str] = field(default_factory=dict)        # clip_id -> element id
    skipped: dict[str, str] = field(default_factory=dict)    # clip_id -> why not embedded
    blobs: list[tuple[str, str]] = field(default_factory=list)  # (element id, base64)
    bytes: int = 0


def _plan_media(rows: dict[str, dict[str, Any]], order: Sequence[str], cfg: ReportConfig) -> list[str]:
    """Clip ids whose media fits, in gallery order, under max_media_mb and max_clip_mb."""
    budget, per_clip = cfg.max_media_mb * 2**20, cfg.max_clip_mb * 2**20
    chosen, used = [], 0
    for cid in order:
        size = rows[cid].get("media_bytes") or 0
        if not size or size > per_clip or used + size > budget:
            continue
        chosen.append(cid)
        used += size
    return chosen


def _media_reason(row: dict[str, Any], cfg: ReportConfig, embedded: bool) -> str:
    size = row.get("media_bytes") or 0
    if embedded:
        return ""
    if not size:
        return "no video stored for this clip" if row.get("kept") else "dropped clips keep no video"
    if size > cfg.max_clip_mb * 2**20:
        return f"video not embedded ({size / 2**20:.1f} MB > max_clip_mb)"
    return "video not embedded (page media cap reached)"


def _card(row: dict[str, Any], media_el: str | None, note: str, *, show_reasons: bool) -> str:
    cid = str(row["clip_id"])
    thumb = row.get("thumbnail")
    if thumb:
        img = (f'<img class="thumb" alt="thumbnail of clip {esc(cid)}" decoding="async" '
               f'src="data:image/jpeg;base64,{base64.b64encode(bytes(thumb)).decode("ascii")}">')
    else:
        img = '<div class="thumb missing">no thumbnail</div>'
    play = '<span class="play" aria-hidden="true">▶</span>' if media_el else ""
    attrs = f' data-media="{media_el}" tabindex="0" role="button" aria-label="play clip"' if media_el else ""
    uri = str(row.get("uri") or "")
    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    span = f"{_num(row.get('start_s'), 3)}–{_num(row.get('end_s'), 3)} s"
    dims = f"{row.get('width') or '?'}×{row.get('height') or '?'}"
    parts = [f'<article class="card" data-clip="{esc(cid)}">',
             f'<div class="frame"{attrs}>{img}{play}</div>',
             f'<div class="meta"><div class="src" title="{esc(uri)}">{esc(name)}</div>',
             f'<div class="sub">{esc(span)} · {esc(_num(row.get("duration_s"), 3))} s · {esc(dims)} · '
             f'{esc(row.get("aspect_bucket") or "?")}'
             + (f' · {esc(row["camera_motion"])}' if row.get("camera_motion") else "") + "</div>"]
    if show_reasons and row.get("reject_reasons"):
        chips = "".join(f'<span class="reason">{esc(r)}</span>' for r in row["reject_reasons"])
        parts.append(f'<div class="chips">{chips}</div>')
    for key, label in (("caption", "caption"), ("prompt_short", "prompt"), ("source_caption", "source caption")):
        if row.get(key):
            parts.append(f'<p class="text {key}"><b>{esc(label)}:</b> {esc(row[key])}</p>')
    if row.get("prompt_long"):
        parts.append(f'<details class="text"><summary>long prompt</summary><p class="prompt_long">'
                     f'{esc(row["prompt_long"])}</p></details>')
    models = [f"{k}: {row[k]}" for k in ("caption_model", "prompt_model") if row.get(k)]
    if models:
        parts.append(f'<div class="sub">{esc(" · ".join(models))}</div>')
    if row.get("ocr_text"):
        parts.append(f'<p class="text ocr"><b>on-screen text:</b> {esc(row["ocr_text"])}</p>')
    scores = [(k, row.get(k)) for k in _CARD_SCORES if row.get(k) is not None]
    if scores:
        cells = "".join(f'<dt title="{esc(k)}">{esc(k.removesuffix("_score"))}</dt><dd>{esc(_num(float(v), 3))}</dd>'
                        for k, v in scores)
        parts.append(f'<dl class="scores">{cells}</dl>')
    if row.get("duplicate_of"):
        parts.append(f'<div class="sub">near-duplicate of {esc(row["duplicate_of"])}</div>')
    if note:
        parts.append(f'<div class="sub nomedia">{esc(note)}</div>')
    parts.append(f'<div class="sub id">{esc(cid)}</div></div></article>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ the page


def _template() -> tuple[str, str, str]:
    """(page skeleton, CSS, JS) from report_template.html (sections marked by <!--CSS--> ... <!--/JS-->)."""
    text = _TEMPLATE.read_text(encoding="utf-8")

    def cut(tag: str) -> str:
        start, end = f"<!--{tag}-->", f"<!--/{tag}-->"
        i, j = text.index(start) + len(start), text.index(end)
        return text[i:j].strip("\n")

    return cut("PAGE"), cut("CSS"), cut("JS")


def build_report(out: str | os.PathLike, cfg: ReportConfig | None = None) -> tuple[str, ReportSummary]:
    """The report page of dataset OUT as one HTML string, and a summary of what went into it.

    Reads only committed shards (via DuckDB) and run.json; never writes to OUT. Raises ReportError when OUT
    is not a clipmill dataset.
    """
    cfg = cfg or ReportConfig()
    t0 = time.perf_counter()
    root = Path(out)
    if not root.is_dir():
        raise ReportError(f"{out} is not a directory; give the output directory of a clipmill run")
    if not (root / "run.json").exists() and not (root / "_commits").is_dir():
        raise ReportError(f"{out} is not a clipmill dataset (no run.json, no _commits/); give the -o directory "
                          f"of a `clipmill run`")
    try:
        meta = read_run_json(root)
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {root / 'run.json'}: {exc}") from exc
    if meta is not None and not isinstance(meta, dict):
        log.warning("%s is not a JSON object; the report leaves out the recipe and the run timings", root / "run.json")
        meta = None
    recipe = (meta or {}).get("recipe")
    if not isinstance(recipe, dict):
        recipe = None
    params = _filter_params(recipe)
    split = _stage_params(recipe, "split")
    summary = ReportSummary()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 4)
        return now

    try:
        clip_files = [Path(p).resolve() for p in committed_files(root, "clips")]  # before connect: a subset of its
        con = connect(root)
    except (QueryError, OSError, ValueError) as exc:
        raise ReportError(str(exc)) from exc
    try:
        t = time.perf_counter()
        block = _load_light(con, clip_files)
        t = lap("load", t)
        figs = _figures(con, params, split, cfg.bins)
        t = lap("aggregate", t)
        kept_ids, per_reason = _sample_ids(con, cfg, figs.reasons, block)
        t = lap("sample", t)
        rows = _fetch_rows(con, kept_ids + [c for ids in per_reason.values() for c in ids], cfg)
        t = lap("fetch_samples", t)
    except duckdb.Error as exc:
        raise ReportError(f"cannot read {out}: {exc} (if a run or dedup is writing it, run the report again)") from exc
    except OSError as exc:
        raise ReportError(f"cannot read a shard of {out}: {exc}") from exc
    finally:
        con.close()
    order = [c for c in kept_ids if c in rows] + [c for ids in per_reason.values() for c in ids if c in rows]
    order = list(dict.fromkeys(order))
    chosen = _plan_media(rows, order, cfg)

    media = _Media()
    for i, cid in enumerate(chosen):
        data = rows[cid].get("media")
        if data is not None:
            el = f"m{i}"
            media.ids[cid] = el
            media.blobs.append((el, base64.b64encode(data).decode("ascii")))
            media.bytes += len(data)
    for row in rows.values():
        row.pop("media", None)

    def cards(ids: Sequence[str], show_reasons: bool) -> str:
        out_parts = []
        for cid in ids:
            row = rows.get(cid)
            if row is None:
                continue
            el = media.ids.get(cid)
            out_parts.append(_card(row, el, _media_reason(row, cfg, el is not None), show_reasons=show_reasons))
        return "".join(out_parts)

    n_kept = figs.funnel["kept"][0]
    gallery_note = (f"{len(kept_ids):,} of {n_kept:,} kept clips, a fixed sample drawn across the dataset. "
                    f"Hover a clip to play it, click to keep it playing with controls.")
    gallery = (f'<div class="gallery">{cards(kept_ids, False)}</div>' if kept_ids
               else '<p class="empty">No kept clip.</p>')
    reject_parts = []
    for reason, n in figs.reasons[: cfg.max_reasons]:
        ids = per_reason.get(reason, [])
        reject_parts.append(f'<h3 class="reason-head"><span class="reason">{esc(reason)}</span> '
                            f'<span class="sub">{n:,} clips, {len(ids)} shown</span></h3>'
                            f'<div class="gallery small">{cards(ids, True)}</div>')
    if len(figs.reasons) > cfg.max_reasons:
        reject_parts.append(f'<p class="note">{len(figs.reasons) - cfg.max_reasons} rarer reasons have no sample '
                            f'(max_reasons={cfg.max_reasons}).</p>')
    rejects_gallery = "".join(reject_parts) or '<p class="empty">No clip was dropped.</p>'
    skipped = sum(1 for cid in order if cid not in media.ids and (rows[cid].get("media_bytes") or 0))
    cap_note = (f"Embedded video: {len(media.ids)} clips, {media.bytes / 2**20:.1f} MB "
                f"(cap {cfg.max_media_mb:g} MB, {cfg.max_clip_mb:g} MB per clip)"
                + (f"; {skipped} clips over the cap show a thumbnail only." if skipped else "."))

    sections = [
        _section("funnel", "Totals and funnel", _funnel_html(figs)),
        _section("rejects", "Rejects by reason", _rejects_html(figs)),
        _section("scores", "Scores", _scores_html(figs),
                 "Every score over all clips; green = kept, grey = dropped; red lines are the recipe's thresholds."),
        _section("gallery", "Kept clips", gallery, esc(gallery_note)),
        _section("dropped", "Dropped clips by reason", rejects_gallery,
                 esc(f"Up to {cfg.per_reason} clips per reason, a fixed sample.")),
        _section("distributions", "Duration, aspect, resolution", _distributions_html(figs)),
        _section("recipe", "Recipe", _recipe_html(meta, params)),
        _section("timings", "Run timings", _timings_html(meta)),
    ]
    page, css, js = _template()
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    versions = (meta or {}).get("versions") or {}
    header_sub = " · ".join(x for x in [
        f"schema {(meta or {}).get('schema_version', '?')}",
        f"updated {meta['updated_at']}" if (meta or {}).get("updated_at") else "",
        f"report {generated}",
        ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else "",
    ] if x)
    blobs = "".join(f'<script type="application/x-clipmill-mp4" id="{el}">{b64}</script>' for el, b64 in media.blobs)
    csp = (f"default-src 'none'; img-src data: blob:; media-src data: blob:; style-src {_csp_hash(css)}; "
           f"script-src {_csp_hash(js)}; base-uri 'none'; form-action 'none'")
    fills = {
        "CSP": esc(csp),
        "TITLE": esc(f"clipmill report: {root.resolve().name}"),
        "DATASET": esc(str(root.resolve())),
        "HEADER_SUB": esc(header_sub),
        "CSS": css,
        "JS": js,
        "SECTIONS": "".join(sections),
        "FOOTER": esc(f"{cap_note} Generated by clipmill from the committed shards of {root.resolve()}; "
                      f"this file needs no network."),
        "MEDIA": blobs,
    }
    text = _fill(page, fills)
    lap("render", t)
    summary.bytes = len(text.encode("utf-8"))
    summary.seconds = round(time.perf_counter() - t0, 4)
    summary.clips = figs.funnel["clips"][0]
    summary.kept = n_kept
    summary.gallery = len(kept_ids)
    summary.reject_samples = sum(len(v) for v in per_reason.values())
    summary.media_embedded = len(media.ids)
    summary.media_bytes = media.bytes
    summary.media_skipped = skipped
    summary.phase_seconds = phases
    return text, summary


def _fill(page: str, fills: dict[str, str]) -> str:
    """Replace each {{KEY}} of the skeleton once, left to right, without re-scanning inserted text."""
    out, pos = [], 0
    while True:
        i = page.find("{{", pos)
        if i < 0:
            out.append(page[pos:])
            return "".join(out)
        j = page.index("}}", i)
        out.append(page[pos:i])
        out.append(fills[page[i + 2:j]])
        pos = j + 2


def write_report(out: str | os.PathLike, path: str | os.PathLike, cfg: ReportConfig | None = None,
                 *, progress: Callable[[str], None] | None = None) -> ReportSummary:
    """Build the report of OUT and write it to `path` atomically (temporary file + rename).

    Returns the summary with `path` and `seconds` (build + write). Raises ReportError on a bad dataset or
    an unwritable path.
    """
    t0 = time.perf_counter()
    if progress:
        progress(f"reading {out}")
    text, summary = build_report(out, cfg)
    dest = Path(path)
    if dest.is_dir():
        raise ReportError(f"{path} is a directory; give a file name such as {Path(path) / 'report.html'}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}; check the directory and permissions") from exc
    summary.path = str(dest)
    summary.seconds = round(time.perf_counter() - t0, 4)
    return summary


__all__ = ["ReportConfig", "ReportError", "ReportSummary", "build_report", "esc", "svg_bars", "svg_histogram",
           "svg_lines", "thresholds_for", "write_report"]
