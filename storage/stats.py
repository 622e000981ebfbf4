"""Summary statistics of a dataset's committed shards (the numbers behind `clipmill stats`/reports).

Everything is computed with DuckDB over the views of `storage.query.connect`, so only committed shards
count and the SQL here is the only SQL run (no user input). Works on an empty dataset and on one whose
inputs were all rejected (distributions are then None / empty).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import duckdb

from clipmill.storage.query import QueryError, connect
from clipmill.storage.schema import STATUSES

log = logging.getLogger(__name__)

SCORES = ("brightness", "contrast", "sharpness", "frame_diff", "black_fraction", "brisque", "blockiness", "exposure",
          "motion_score", "text_area", "nsfw_score", "aesthetic_score")
HIST_BINS = 10
_QUANTILES = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    """{key: count} from a query returning (key, count) rows, biggest first; NULL keys read 'unknown'."""
    return {("unknown" if k is None else str(k)): int(n) for k, n in con.execute(sql).fetchall()}


def _distribution(con: duckdb.DuckDBPyConnection, table: str, column: str, where: str = "true") -> dict[str, Any]:
    """count/min/p10/p50/p90/max of a numeric column over non-NULL, finite values (None when there are none)."""
    qs = ", ".join(f"quantile_cont(x, {q})" for _, q in _QUANTILES)
    row = con.execute(
        f'SELECT count(x), min(x), {qs}, max(x) FROM (SELECT CAST("{column}" AS DOUBLE) AS x FROM {table} '
        f"WHERE {where}) WHERE x IS NOT NULL AND isfinite(x)"
    ).fetchone()
    keys = ["count", "min"] + [k for k, _ in _QUANTILES] + ["max"]
    out = dict(zip(keys, row, strict=True))
    out["count"] = int(out["count"] or 0)
    return out


def _histogram(con: duckdb.DuckDBPyConnection, lo: float | None, hi: float | None) -> list[dict[str, Any]]:
    """Clip durations in HIST_BINS equal-width bins over [lo, hi]; one bin when all are equal; [] when none."""
    if lo is None or hi is None:
        return []
    if hi <= lo:
        n = con.execute("SELECT count(*) FROM clips WHERE duration_s = ?", [lo]).fetchone()[0]
        return [{"lo": lo, "hi": hi, "count": int(n)}]
    width = (hi - lo) / HIST_BINS
    rows = dict(con.execute(
        "SELECT least(CAST(floor((duration_s - ?) / ?) AS INTEGER), ?) AS b, count(*) FROM clips "
        "WHERE duration_s IS NOT NULL AND isfinite(duration_s) GROUP BY b", [lo, width, HIST_BINS - 1],
    ).fetchall())
    return [{"lo": lo + i * width, "hi": lo + (i + 1) * width, "count": int(rows.get(i, 0))}
            for i in range(HIST_BINS)]


def dataset_stats(out: str | os.PathLike) -> dict[str, Any]:
    """Statistics of OUT's committed shards as a plain dict (JSON-able).

    Keys: inputs (total, by_status), input_reasons ({status: {reason: n}} for rejected/failed inputs),
    clips (total, kept, rejected, undecided), reject_reasons (each element of clips.reject_reasons counted),
    hours (videos: sum of known input durations; clips; kept_clips), clip_duration (count/min/p10/p50/p90/max
    + histogram bins), scores ({score: count/min/p10/p50/p90/max}), resolutions and aspect_buckets (clip
    counts), codecs (input counts). Does not read uncommitted files, media bytes or run.json.
    Raises QueryError when OUT cannot be opened.
    """
    con = connect(out)
    try:
        return _stats(con)
    except duckdb.Error as exc:
        raise QueryError(f"cannot compute statistics of {out}: {exc}") from exc
    finally:
        con.close()


def _stats(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    by_status = {s: 0 for s in STATUSES}
    by_status.update(_counts(con, "SELECT status, count(*) AS n FROM videos GROUP BY status ORDER BY n DESC"))
    input_reasons: dict[str, dict[str, int]] = {}
    for status in STATUSES[1:]:
        input_reasons[status] = _counts(
            con, f"SELECT reason, count(*) AS n FROM videos WHERE status = '{status}' GROUP BY reason "
                 f"ORDER BY n DESC, reason",
        )
    total, kept, rejected = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE kept), count(*) FILTER (WHERE NOT kept) FROM clips"
    ).fetchone()
    reject_reasons = _counts(
        con, "SELECT r, count(*) AS n FROM (SELECT unnest(reject_reasons) AS r FROM clips) GROUP BY r "
             "ORDER BY n DESC, r",
    )
    video_s, = con.execute("SELECT coalesce(sum(duration_s), 0) FROM videos").fetchone()
    clip_s, kept_s = con.execute(
        "SELECT coalesce(sum(duration_s), 0), coalesce(sum(duration_s) FILTER (WHERE kept), 0) FROM clips"
    ).fetchone()
    duration = _distribution(con, "clips", "duration_s")
    duration["histogram"] = _histogram(con, duration["min"], duration["max"])
    return {
        "inputs": {"total": sum(by_status.values()), "by_status": by_status},
        "input_reasons": input_reasons,
        "clips": {"total": int(total), "kept": int(kept), "rejected": int(rejected),
                  "undecided": int(total - kept - rejected)},
        "reject_reasons": reject_reasons,
        "hours": {"videos": video_s / 3600.0, "clips": clip_s / 3600.0, "kept_clips": kept_s / 3600.0},
        "clip_duration": duration,
        "scores": {s: _distribution(con, "clips", s) for s in SCORES},
        "resolutions": _counts(
            con, "SELECT CASE WHEN width IS NULL OR height IS NULL THEN NULL ELSE width || 'x' || height END AS r,"
                 " count(*) AS n FROM clips GROUP BY r ORDER BY n DESC, r",
        ),
        "aspect_buckets": _counts(
            con, "SELECT aspect_bucket, count(*) AS n FROM clips GROUP BY aspect_bucket ORDER BY n DESC, aspect_bucket",
        ),
        "codecs": _counts(con, "SELECT codec, count(*) AS n FROM videos GROUP BY codec ORDER BY n DESC, codec"),
        "camera_motion": _counts(
            con, "SELECT camera_motion, count(*) AS n FROM clips WHERE camera_motion IS NOT NULL "
                 "GROUP BY camera_motion ORDER BY n DESC, camera_motion",
        ),
        "near_duplicates": _counts(
            con, "SELECT CASE WHEN duplicate_of IS NULL THEN 'unique or best copy' ELSE 'duplicate' END AS d,"
                 " count(*) AS n FROM clips GROUP BY d ORDER BY d",
        ),
    }


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _pct(n: int, total: int) -> str:
    return f"{n} ({100.0 * n / total:.1f}%)" if total else str(n)


def _block(title: str, counts: dict[str, int], total: int | None = None, indent: str = "  ") -> list[str]:
    if not counts:
        return [f"{title}: none"]
    width = max(len(k) for k in counts)
    tot = total if total is not None else sum(counts.values())
    return [f"{title}:"] + [f"{indent}{k.ljust(width)}  {_pct(n, tot)}" for k, n in counts.items()]


def format_stats(stats: dict[str, Any]) -> str:
    """Render `dataset_stats()` output as plain aligned text for a terminal (no colour, no markup)."""
    lines: list[str] = []
    inputs, clips = stats["inputs"], stats["clips"]
    lines += _block(f"inputs ({inputs['total']})", inputs["by_status"], inputs["total"])
    for status, reasons in stats["input_reasons"].items():
        if reasons:
            lines += _block(f"{status} inputs by reason", reasons)
    lines.append(
        f"clips: {clips['total']}  kept {_pct(clips['kept'], clips['total'])}  "
        f"rejected {_pct(clips['rejected'], clips['total'])}"
        + (f"  undecided {clips['undecided']}" if clips["undecided"] else "")
    )
    if stats["reject_reasons"]:
        lines += _block("clip reject reasons (a clip can have several)", stats["reject_reasons"], clips["total"])
    h = stats["hours"]
    lines.append(f"hours: video {h['videos']:.3f}  clips {h['clips']:.3f}  kept clips {h['kept_clips']:.3f}")

    d = stats["clip_duration"]
    lines.append(
        f"clip duration (s): n={d['count']}  min {_num(d['min'])}  p10 {_num(d['p10'])}  p50 {_num(d['p50'])}"
        f"  p90 {_num(d['p90'])}  max {_num(d['max'])}"
    )
    hist = d.get("histogram") or []
    peak = max((b["count"] for b in hist), default=0)
    for b in hist:
        bar = "#" * (round(30 * b["count"] / peak) if peak else 0)
        lines.append(f"  {b['lo']:8.2f} - {b['hi']:8.2f}  {b['count']:6d}  {bar}")

    lines.append("scores (all clips):" + ("" if any(s["count"] for s in stats["scores"].values()) else " none"))
    width = max(len(k) for k in stats["scores"])
    for name, s in stats["scores"].items():
        if s["count"]:
            lines.append(
                f"  {name.ljust(width)}  n={s['count']}  min {_num(s['min'])}  p10 {_num(s['p10'])}  "
                f"p50 {_num(s['p50'])}  p90 {_num(s['p90'])}  max {_num(s['max'])}"
            )
    lines += _block("clip resolutions", stats["resolutions"])
    lines += _block("clip aspect buckets", stats["aspect_buckets"])
    lines += _block("input codecs", stats["codecs"])
    if stats.get("camera_motion"):
        lines += _block("camera motion", stats["camera_motion"])
    if stats.get("near_duplicates"):
        lines += _block("near-duplicates", stats["near_duplicates"])
    return "\n".join(lines) + "\n"


__all__ = ["HIST_BINS", "SCORES", "dataset_stats", "format_stats"]
