"""Global near-duplicate marking: writes `duplicate_of` into the committed clip shards of a dataset.

Near-duplicate clips (re-encodes, rescales, light crops, the same footage from two uploads) are found by
their `embedding` (L2-normalised float32 vectors): two clips with the same `embedding_model` and cosine
similarity >= `threshold` are linked, and linked clips form a group (transitively: A~B and B~C put A, B, C
in one group even when A and C are less similar). Every member of a group except its best-quality member
gets `duplicate_of` = the best member's clip_id; the best member and clips without a duplicate get NULL.
Clips of different embedding models are never compared; clips without an embedding are never duplicates.

Best quality (first difference wins; see `QUALITY_ORDER`): kept=True before NULL before False, then more
pixels (width*height), then lower BRISQUE, then higher sharpness, then longer duration, then the smaller
clip_id. A missing score sorts after any present one.

How it scales (the SemDeDup / LSH pattern; no step holds all embeddings in RAM):

  1. read     stream (clip_id, embedding, model, quality columns) from the committed clip shards in Arrow
              batches (never the media) and spill them per model under OUT/_tmp_dedup: embeddings to a raw
              float32 file (read back as a memory map), quality columns to a Parquet file.
  2. lsh      random-hyperplane LSH (seeded): `bands` bands of `bits` sign bits each; (bucket key, clip)
              pairs are spilled to hash partitions on disk. Two clips sharing a bucket in any band are
              candidates. `plan_lsh` picks bits from the clip count (buckets stay small) and bands so that a
              pair at exactly `threshold` is a candidate with probability >= `recall` (0.99 by default;
              pairs more similar than the threshold are found with higher probability).
  3. compare  per partition: group pairs by bucket, exact cosine (batched matrix products, at most
              `block_size` clips gathered at once; huge buckets are tiled) and union-find over the pairs
              >= threshold. Buckets whose members are already one group are skipped.
  4. choose   the best member of every group by the quality ordering (only group members are loaded).
  5. write    each clip shard whose `duplicate_of` values change is rewritten under a new name
              (clips/part-NNNNN.rK.parquet), then its commit record is replaced atomically, then the old
              file is deleted. A crash at any point leaves either the old or the new shard committed;
              the next run deletes the leftovers. Shards whose values do not change are not touched, so a
              second run over unchanged data rewrites nothing.

What it does not do: it does not look at pixels (quality of the embedding decides what "the same" is),
does not drop or move clips (selection is a SQL `WHERE duplicate_of IS NULL`), and finds a pair below
1.0 probability (LSH). It holds OUT's write lock for the whole run, so it never runs beside a writer.
RAM: one int64 per embedded clip (the union-find forest) plus the group members' quality rows, plus
bounded batches.

The threshold default 0.95 is meant for the weight-free perceptual embedding, where re-encodes and
rescales of the same shot land at >= 0.97 and different shots of one scene mostly below 0.9; tune it
per embedding model (CLIP-like models typically need ~0.9-0.95).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipmill.storage.shards import (
    COMMITS,
    CommitRecord,
    DatasetError,
    ShardFile,
    ShardWriter,
    file_sha256,
    fsync_dir,
    read_commits,
    write_json_atomic,
    write_parquet_durable,
)

log = logging.getLogger(__name__)

DUPLICATE_OF = "duplicate_of"
DEFAULT_THRESHOLD = 0.95
DEFAULT_BLOCK_SIZE = 20_000
DEFAULT_RECALL = 0.99
TMP_DIR = "_tmp_dedup"
READ_BATCH = 8192
QUALITY_COLUMNS = ("kept", "width", "height", "brisque", "sharpness", "duration_s")
# (column, direction) after the derived ones; see the module docstring.
QUALITY_ORDER = (("kept_rank", "ascending"), ("pixels", "descending"), ("brisque", "ascending"),
                 ("sharpness", "descending"), ("duration_s", "descending"), ("clip_id", "ascending"))

_GRAM_FLOATS = 1 << 24  # at most this many similarities (64 MiB) in one matrix product
_PART_BYTES = 256 << 20  # target size of one spilled LSH partition
_PAIR = np.dtype([("key", "<u8"), ("idx", "<i8")])
_REVISION = re.compile(r"^\.?(part-\d{5,})\.r(\d+)\.parquet(\.tmp)?$")
_ORIGINAL = re.compile(r"^(part-\d{5,})\.parquet$")

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): called as phases advance (total 0 when unknown)."""


# ---------------------------------------------------------------------------------------------------------
# LSH plan
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LSHPlan:
    """Random-hyperplane LSH parameters: `bands` bands of `bits` sign bits each.

    Args:
        bands: number of independent bucketings; a pair is a candidate when it shares a bucket in any.
        bits: sign bits per band (1..32); more bits make smaller buckets and lower per-band recall.
    """

    bands: int
    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise ValueError(f"LSHPlan.bits must be in 1..32, got {self.bits}")
        if self.bands < 1:
            raise ValueError(f"LSHPlan.bands must be >= 1, got {self.bands}")

    def recall_at(self, cosine: float) -> float:
        """Probability that a pair of this cosine similarity becomes a candidate."""
        p = 1.0 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi
        return 1.0 - (1.0 - p ** self.bits) ** self.bands


def plan_lsh(n: int, threshold: float, *, recall: float = DEFAULT_RECALL, bucket: int = 4,
             max_bands: int = 64) -> LSHPlan:
    """LSH parameters for `n` clips: bits so that unrelated clips share a bucket with ~`bucket` others,
    bands so that a pair at exactly `threshold` is a candidate with probability >= `recall`.

    Bits grow with log2(n), bands with n**0.15 (at threshold 0.95), so the candidate work grows a little
    faster than n. Bands are capped at `max_bands`; a warning says the recall reached when the cap binds.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0.0 < recall < 1.0:
        raise ValueError(f"recall must be in (0, 1), got {recall}")
    bits = int(min(24, max(6, math.ceil(math.log2(max(n, 2) / bucket)))))
    p = (1.0 - math.acos(threshold) / math.pi) ** bits
    bands = max(1, math.ceil(math.log(1.0 - recall) / math.log1p(-p))) if p < 1.0 else 1
    if bands > max_bands:
        plan = LSHPlan(max_bands, bits)
        log.warning("dedup: LSH capped at %d bands; recall at cosine %.3f is %.3f (asked %.3f); a higher "
                    "threshold or fewer clips per run raises it", max_bands, threshold,
                    plan.recall_at(threshold), recall)
        return plan
    return LSHPlan(bands, bits)


# ---------------------------------------------------------------------------------------------------------
# Spilled embeddings
# ---------------------------------------------------------------------------------------------------------

class _EmbeddingSpill:
    """Append-only raw float32 file of unit vectors (rows), read back as a memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.n = 0
        self.dim = 0
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())

    def append(self, x: np.ndarray) -> None:
        if x.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array (clips, dim), got shape {x.shape}")
        if len(x) == 0:
            return
        if self.dim and x.shape[1] != self.dim:
            raise ValueError(f"embedding dimension changed from {self.dim} to {x.shape[1]}")
        self.dim = x.shape[1]
        np.ascontiguousarray(x, dtype=np.float32).tofile(self._f)
        self.n += len(x)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def open_map(self) -> np.ndarray:
        self.close()
        if self.n == 0:
            return np.zeros((0, max(self.dim, 1)), np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.n, self.dim))


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit-normalised rows, mask of usable rows): rows with a zero norm or a non-finite value are unusable."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    return x[ok] / norms[ok, None], ok


# ---------------------------------------------------------------------------------------------------------
# Union-find over int64 arrays (vectorised; the root of a group is its smallest index)
# ---------------------------------------------------------------------------------------------------------

def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    touched = np.unique(np.concatenate([u, v]))
    while len(u):
        ru, rv = _find(parent, u), _find(parent, v)
        diff = ru != rv
        u, v, ru, rv = u[diff], v[diff], ru[diff], rv[diff]
        if not len(u):
            break
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
    if len(touched):
        parent[touched] = _find(parent, touched)


# ---------------------------------------------------------------------------------------------------------
# find_duplicates: the method, on one embedding space
# ---------------------------------------------------------------------------------------------------------

@dataclass
class DuplicateGroups:
    """Result of `find_duplicates`: `labels[i]` is the smallest index of clip i's group (i when alone).

    Indices count rows in the order the embeddings were given (unusable rows included: zero or
    non-finite vectors are never duplicates).
    """

    labels: np.ndarray
    dim: int
    plan: LSHPlan | None
    candidate_pairs: int = 0
    similar_pairs: int = 0
    largest_bucket: int = 0
    skipped_buckets: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of rows given (usable or not)."""
        return len(self.labels)

    def groups(self) -> list[np.ndarray]:
        """Index arrays of every group with more than one member, ordered by their smallest index."""
        if not len(self.labels):
            return []
        order = np.argsort(self.labels, kind="stable")
        lab = self.labels[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        return [g for g in np.split(order, starts[1:]) if len(g) > 1]

    @property
    def n_groups(self) -> int:
        """Number of groups with more than one member."""
        counts = np.bincount(self.labels, minlength=len(self.labels)) if len(self.labels) else np.zeros(0)
        return int((counts > 1).sum())

    @property
    def n_duplicates(self) -> int:
        """Clips that belong to a group and are not its representative (members minus groups)."""
        return int((self.labels != np.arange(len(self.labels))).sum())


def find_duplicates(
    embeddings: Iterable[np.ndarray],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
    recall: float = DEFAULT_RECALL,
    plan: LSHPlan | None = None,
    workdir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> DuplicateGroups:
    """Group near-duplicate vectors of ONE embedding space given as batches of (rows, dim) arrays.

    Rows are normalised here (zero or non-finite rows are never duplicates). Batches are spilled to a
    temporary directory (under `workdir` when given, removed afterwards), so the input can be a generator
    over more rows than fit in RAM. Returns groups, not a choice of the best member (`dedup_dataset` does
    that with the quality columns). Deterministic for the same input, `seed` and plan.

    Args:
        embeddings: iterable of float arrays, each (rows, dim); all of the same dim.
        threshold: cosine similarity at or above which two rows are linked.
        block_size: at most this many rows are gathered for one exact comparison (bounds memory).
        seed: seed of the random hyperplanes.
        recall: probability that a pair at exactly `threshold` is compared (used when `plan` is None).
        plan: explicit LSH bands/bits; by default `plan_lsh(n, threshold, recall=recall)`.
        workdir: parent directory of the temporary spill directory (system temp when None).
        progress: progress(phase, done, total) callback.
    """
    _check_args(threshold, block_size)
    tmp = Path(tempfile.mkdtemp(prefix="dedup-", dir=workdir))
    try:
        t0 = time.monotonic()
        spill = _EmbeddingSpill(tmp / "emb.f32")
        usable: list[np.ndarray] = []
        n_total = 0
        for batch in embeddings:
            x = np.asarray(batch)
            if x.ndim != 2:
                raise ValueError(f"each embeddings batch must be 2-D (rows, dim), got shape {x.shape}")
            unit, ok = _unit_rows(x)
            spill.append(unit)
            usable.append(np.flatnonzero(ok) + n_total)
            n_total += len(x)
        local_to_row = np.concatenate(usable) if usable else np.zeros(0, np.int64)
        read_s = time.monotonic() - t0
        res = _find_in_spill(spill, tmp, threshold=threshold, block_size=block_size, seed=seed, recall=recall,
                             plan=plan, progress=progress)
        labels = np.arange(n_total, dtype=np.int64)
        labels[local_to_row] = local_to_row[res.labels]  # order-preserving map keeps "smallest index" roots
        res.labels = labels
        res.seconds = {"read": read_s, **res.seconds}
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_args(threshold: float, block_size: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")


def _find_in_spill(spill: _EmbeddingSpill, tmp: Path, *, threshold: float, block_size: int, seed: int,
                   recall: float, plan: LSHPlan | None, progress: Progress | None) -> DuplicateGroups:
    """LSH partitioning + exact comparison + union-find over a spilled, unit-normalised embedding file."""
    n, dim = spill.n, spill.dim
    emb = spill.open_map()
    res = DuplicateGroups(labels=np.arange(n, dtype=np.int64), dim=dim, plan=None)
    if n < 2:
        return res
    plan = plan or plan_lsh(n, threshold, recall=recall)
    res.plan = plan

    # -- lsh: signatures, spilled as (key, idx) pairs into hash partitions ------------------------------
    t0 = time.monotonic()
    parts = _write_partitions(emb, plan, seed, tmp, progress)
    res.seconds["lsh"] = time.monotonic() - t0

    # -- compare: exact cosine within buckets, union-find -------------------------------------------------
    t0 = time.monotonic()
    parent = res.labels  # union-find forest, in place
    for i, path in enumerate(parts):
        pairs = np.fromfile(path, dtype=_PAIR)
        path.unlink()
        _compare_partition(pairs, emb, parent, threshold, block_size, res)
        if progress:
            progress("compare", i + 1, len(parts))
    for s in range(0, n, 1 << 20):  # final path compression: every label is its group's root
        parent[s:s + (1 << 20)] = _find(parent, np.arange(s, min(n, s + (1 << 20))))
    res.seconds["compare"] = time.monotonic() - t0
    return res


def _write_partitions(emb: np.ndarray, plan: LSHPlan, seed: int, tmp: Path,
                      progress: Progress | None) -> list[Path]:
    n, dim = emb.shape
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((dim, plan.bands * plan.bits), dtype=np.float32)
    band_tag = np.arange(plan.bands, dtype=np.uint64) << np.uint64(32)
    n_parts = 1 << max(0, math.ceil(math.log2(max(1.0, n * plan.bands * _PAIR.itemsize / _PART_BYTES))))
    n_parts = min(n_parts, 256)
    shift = np.uint64(64 - int(math.log2(n_parts))) if n_parts > 1 else None
    paths = [tmp / f"lsh-{p:03d}.bin" for p in range(n_parts)]
    files = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below)
    try:
        chunk = max(1, (64 << 20) // (4 * (dim + plan.bands * plan.bits)))
        for s in range(0, n, chunk):
            x = np.asarray(emb[s:s + chunk])
            bits = (x @ planes > 0).reshape(len(x), plan.bands, plan.bits)
            keys = np.broadcast_to(band_tag, (len(x), plan.bands)).copy()  # (c, bands)
            for j in range(plan.bits):
                keys |= bits[:, :, j].astype(np.uint64) << np.uint64(j)
            pairs = np.empty(keys.size, dtype=_PAIR)
            pairs["key"] = keys.T.ravel()  # band-major: within a band, rows stay in index order
            pairs["idx"] = np.tile(np.arange(s, s + len(x), dtype=np.int64), plan.bands)
            if shift is None:
                pairs.tofile(files[0])
            else:
                part = (pairs["key"] * np.uint64(0x9E3779B97F4A7C15)) >> shift  # Fibonacci hashing
                order = np.argsort(part, kind="stable")
                pairs, part = pairs[order], part[order]
                bounds = np.searchsorted(part, np.arange(n_parts + 1, dtype=np.uint64))
                for p in range(n_parts):
                    if bounds[p + 1] > bounds[p]:
                        pairs[bounds[p]:bounds[p + 1]].tofile(files[p])
            if progress:
                progress("lsh", min(n, s + chunk), n)
    finally:
        for f in files:
            f.close()
    return paths


def _compare_partition(pairs: np.ndarray, emb: np.ndarray, parent: np.ndarray, threshold: float,
                       block_size: int, res: DuplicateGroups) -> None:
    """Exact cosine within every bucket of one partition; links pairs >= threshold into `parent`."""
    if len(pairs) < 2:
        return
    order = np.argsort(pairs["key"], kind="stable")
    keys, members = pairs["key"][order], pairs["idx"][order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    multi = sizes > 1
    if not multi.any():
        return
    members = members[np.repeat(multi, sizes)]  # only buckets of >= 2 clips, contiguous
    sizes = sizes[multi]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    res.largest_bucket = max(res.largest_bucket, int(sizes.max()))
    # buckets whose members are already one group add nothing
    roots = _find(parent, members)
    same = np.minimum.reduceat(roots, starts) == np.maximum.reduceat(roots, starts)
    res.skipped_buckets += int(same.sum())
    starts, sizes = starts[~same], sizes[~same]
    small_max = min(block_size, int(math.isqrt(_GRAM_FLOATS)))
    edges_u: list[np.ndarray] = []
    edges_v: list[np.ndarray] = []
    for m in np.unique(sizes):
        m = int(m)
        group_starts = starts[sizes == m]
        if m <= small_max:
            per = max(1, min(block_size // m, _GRAM_FLOATS // (m * m)))
            iu, ju = np.triu_indices(m, k=1)
            for s in range(0, len(group_starts), per):
                idx = members[group_starts[s:s + per, None] + np.arange(m)]  # (k, m)
                x = np.asarray(emb[idx.ravel()]).reshape(len(idx), m, -1)  # (k, m, dim)
                sim = np.matmul(x, x.transpose(0, 2, 1))[:, iu, ju]  # (k, m*(m-1)/2)
                res.candidate_pairs += sim.size
                hit = sim >= threshold
                if hit.any():
                    b, p = np.nonzero(hit)
                    edges_u.append(idx[b, iu[p]])
                    edges_v.append(idx[b, ju[p]])
        else:
            for st in group_starts:
                u, v = _compare_large(members[st:st + m], emb, threshold, block_size, res)
                edges_u.append(u)
                edges_v.append(v)
    if edges_u:
        u, v = np.concatenate(edges_u), np.concatenate(edges_v)
        res.similar_pairs += len(u)
        _union(parent, u, v)


def _compare_large(ids: np.ndarray, emb: np.ndarray, threshold: float, block_size: int,
                   res: DuplicateGroups) -> tuple[np.ndarray, np.ndarray]:
    """All pairs >= threshold of one big bucket, in tiles (upper triangle only)."""
    m = len(ids)
    cols = min(m, block_size)
    rows = max(1, _GRAM_FLOATS // cols)
    us: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    for r0 in range(0, m, rows):
        xr = np.asarray(emb[ids[r0:r0 + rows]])
        for c0 in range(r0, m, cols):
            xc = np.asarray(emb[ids[c0:c0 + cols]])
            sim = xr @ xc.T
            ri = np.arange(r0, r0 + len(xr))[:, None]
            ci = np.arange(c0, c0 + len(xc))[None, :]
            hit = (sim >= threshold) & (ci > ri)
            res.candidate_pairs += int(np.count_nonzero(ci > ri))
            a, b = np.nonzero(hit)
            us.append(ids[r0 + a])
            vs.append(ids[c0 + b])
    return np.concatenate(us), np.concatenate(vs)


# ---------------------------------------------------------------------------------------------------------
# dedup_dataset: the whole dataset, written back atomically
# ---------------------------------------------------------------------------------------------------------

@dataclass
class DedupReport:
    """What `dedup_dataset` did: counts, per-phase seconds and the LSH plans used per embedding model.

    Args:
        clips: committed clip rows read; with_embedding: those with a usable embedding; models: per model.
        groups: groups of >= 2 clips; duplicates: clips given a `duplicate_of` (group members minus groups).
        candidate_pairs: exact cosine similarities computed.
        shards / shards_rewritten: committed clip shards, and how many changed this run.
        leftovers_removed: files of an interrupted earlier dedup that were deleted.
        plans: LSH bands and bits per model; seconds: per phase (read, lsh, compare, choose, write).
    """

    clips: int = 0
    with_embedding: int = 0
    models: dict[str, int] = field(default_factory=dict)
    groups: int = 0
    duplicates: int = 0
    candidate_pairs: int = 0
    shards: int = 0
    shards_rewritten: int = 0
    leftovers_removed: int = 0
    threshold: float = DEFAULT_THRESHOLD
    plans: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain data (for run.json and the CLI)."""
        return {
            "clips": self.clips, "with_embedding": self.with_embedding, "models": dict(self.models),
            "groups": self.groups, "duplicates": self.duplicates, "candidate_pairs": self.candidate_pairs,
            "shards": self.shards, "shards_rewritten": self.shards_rewritten,
            "leftovers_removed": self.leftovers_removed, "threshold": self.threshold,
            "plans": {k: dict(v) for k, v in self.plans.items()},
            "phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


@dataclass
class _ModelSpill:
    """Spill of one embedding model: unit vectors, and per row its global clip index + quality columns."""

    emb: _EmbeddingSpill
    quality_path: Path
    writer: pq.ParquetWriter | None = None


_QUALITY_SCHEMA = pa.schema([
    ("gidx", pa.int64()), ("clip_id", pa.string()), ("kept", pa.bool_()), ("width", pa.int32()),
    ("height", pa.int32()), ("brisque", pa.float32()), ("sharpness", pa.float32()), ("duration_s", pa.float64()),
])


def dedup_dataset(
    out: str | os.PathLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
    recall: float = DEFAULT_RECALL,
    progress: Progress | None = None,
) -> DedupReport:
    """Mark near-duplicate clips of dataset OUT: writes `duplicate_of` into its committed clip shards.

    Holds OUT's write lock throughout (raises DatasetError when a run is writing OUT, or when OUT is not
    a clipmill dataset). Temporary files live in OUT/_tmp_dedup and are removed at the end. Idempotent:
    a second run over the same data finds the same groups and rewrites no shard. See the module
    docstring for the method, the quality ordering and crash safety.

    Args:
        out: dataset directory.
        threshold: cosine similarity at or above which two clips of the same embedding model are linked.
        block_size: at most this many clips are gathered for one exact comparison (bounds memory).
        seed: seed of the LSH hyperplanes (same seed, same data -> same result).
        recall: probability that a pair at exactly `threshold` is compared (more bands when higher).
        progress: progress(phase, done, total) callback; phases read, lsh, compare, choose, write.
    """
    _check_args(threshold, block_size)
    out = Path(out)
    if not (out / COMMITS).is_dir():
        raise DatasetError(f"{out} is not a clipmill dataset (no {COMMITS}/); give the OUT of a `clipmill run`")
    report = DedupReport(threshold=threshold)
    with ShardWriter(out):  # the write lock, and recovery of an interrupted commit
        records = [r for r in read_commits(out) if "clips" in r.files]
        report.shards = len(records)
        report.leftovers_removed = _remove_leftovers(out, records)
        tmp = out / TMP_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            t0 = time.monotonic()
            spills, sizes = _spill_dataset(out, records, tmp, report, progress)
            report.seconds["read"] = time.monotonic() - t0
            dup_gidx: list[np.ndarray] = []
            dup_target: list[np.ndarray] = []
            for model, spill in sorted(spills.items()):
                res = _find_in_spill(spill.emb, tmp, threshold=threshold, block_size=block_size, seed=seed,
                                     recall=recall, plan=None, progress=progress)
                for k, v in res.seconds.items():
                    report.seconds[k] = report.seconds.get(k, 0.0) + v
                report.candidate_pairs += res.candidate_pairs
                if res.plan:
                    report.plans[model] = {"bands": res.plan.bands, "bits": res.plan.bits}
                t0 = time.monotonic()
                g, t, n_groups = _choose_best(res.labels, spill.quality_path)
                report.seconds["choose"] = report.seconds.get("choose", 0.0) + time.monotonic() - t0
                report.groups += n_groups
                report.duplicates += len(g)
                dup_gidx.append(g)
                dup_target.append(t)
            gidx = np.concatenate(dup_gidx) if dup_gidx else np.zeros(0, np.int64)
            target = np.concatenate(dup_target) if dup_target else np.zeros(0, object)
            order = np.argsort(gidx, kind="stable")
            t0 = time.monotonic()
            report.shards_rewritten = _write_back(out, records, sizes, gidx[order], target[order], progress)
            report.seconds["write"] = time.monotonic() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dedup %s: %d clips (%d with an embedding), %d groups, %d duplicates, %d/%d shards rewritten",
             out, report.clips, report.with_embedding, report.groups, report.duplicates,
             report.shards_rewritten, report.shards)
    return report


def _spill_dataset(out: Path, records: list[CommitRecord], tmp: Path, report: DedupReport,
                   progress: Progress | None) -> tuple[dict[str, _ModelSpill], list[int]]:
    """Stream embeddings + quality columns of every committed clip shard into per-model spills."""
    spills: dict[str, _ModelSpill] = {}
    sizes: list[int] = []
    gidx0 = 0
    unusable = 0
    try:
        for i, rec in enumerate(records):
            path = _clips_path(out, rec)
            pf = pq.ParquetFile(path)
            have = set(pf.schema_arrow.names)
            cols = [c for c in ("clip_id", "embedding", "embedding_model", *QUALITY_COLUMNS) if c in have]
            n_file = 0
            for batch in pf.iter_batches(batch_size=READ_BATCH, columns=cols):
                t = pa.Table.from_batches([batch])
                n = len(t)
                t = t.append_column("gidx", pa.array(np.arange(gidx0 + n_file, gidx0 + n_file + n), pa.int64()))
                n_file += n
                if "embedding" not in have:
                    continue
                t = t.filter(pc.and_(pc.is_valid(t["embedding"]),
                                     pc.greater(pc.fill_null(pc.list_value_length(t["embedding"]), 0), 0)))
                model_col = (pc.fill_null(t["embedding_model"], "") if "embedding_model" in have
                             else pa.array([""] * len(t), pa.string()))
                for model in sorted(pc.unique(model_col).to_pylist()):
                    part = t.filter(pc.equal(model_col, model))
                    lengths = pc.list_value_length(part["embedding"])
                    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
                    dim = spills[model].emb.dim if model in spills else lo
                    if lo != hi or lo != dim:
                        raise DatasetError(
                            f"{path}: embeddings of model {model!r} have lengths {sorted({lo, hi, dim})}; one "
                            f"model must give one dimension -- re-run the embedding stage for these clips")
                    x = pc.list_flatten(part["embedding"]).to_numpy(zero_copy_only=False)
                    unit, ok = _unit_rows(x.reshape(len(part), lo))
                    unusable += int((~ok).sum())
                    part = part.filter(pa.array(ok))
                    if model not in spills:
                        spills[model] = _ModelSpill(_EmbeddingSpill(tmp / f"emb-{len(spills)}.f32"),
                                                    tmp / f"quality-{len(spills)}.parquet")
                    sp = spills[model]
                    sp.emb.append(unit)
                    if sp.writer is None:
                        sp.writer = pq.ParquetWriter(sp.quality_path, _QUALITY_SCHEMA)
                    sp.writer.write_table(_quality_rows(part))
            sizes.append(n_file)
            gidx0 += n_file
            if progress:
                progress("read", i + 1, len(records))
    finally:
        for sp in spills.values():
            sp.emb.close()
            if sp.writer is not None:
                sp.writer.close()
    if unusable:
        log.warning("dedup: %d clip(s) have a zero or non-finite embedding; they are never duplicates", unusable)
    report.clips = gidx0
    report.models = {m: sp.emb.n for m, sp in sorted(spills.items())}
    report.with_embedding = sum(report.models.values())
    return spills, sizes


def _quality_rows(t: pa.Table) -> pa.Table:
    cols = []
    for f in _QUALITY_SCHEMA:
        cols.append(t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(len(t), f.type))
    return pa.Table.from_arrays(cols, schema=_QUALITY_SCHEMA)


def _choose_best(labels: np.ndarray, quality_path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(global indices of duplicates, clip_id of their group's best member, number of groups)."""
    counts = np.bincount(labels, minlength=len(labels))
    in_group = counts[labels] > 1
    if not in_group.any():
        return np.zeros(0, np.int64), np.zeros(0, object), 0
    chosen: list[pa.Table] = []
    row0 = 0
    for batch in pq.ParquetFile(quality_path).iter_batches(batch_size=1 << 16):
        sel = np.flatnonzero(in_group[row0:row0 + len(batch)])
        if len(sel):
            t = pa.Table.from_batches([batch]).take(pa.array(sel))
            chosen.append(t.append_column("group", pa.array(labels[row0 + sel], pa.int64())))
        row0 += len(batch)
    t = pa.concat_tables(chosen)
    kept = t["kept"]
    kept_rank = pc.if_else(pc.is_null(kept), 1, pc.if_else(pc.fill_null(kept, False), 0, 2))
    pixels = pc.multiply(t["width"].cast(pa.int64()), t["height"].cast(pa.int64()))
    t = t.append_column("kept_rank", kept_rank).append_column("pixels", pixels)
    t = t.sort_by([("group", "ascending"), *QUALITY_ORDER])  # nulls sort last
    group = t["group"].to_numpy()
    first = np.r_[True, group[1:] != group[:-1]]
    best_pos = np.maximum.accumulate(np.where(first, np.arange(len(group)), 0))
    clip_ids = np.asarray(t["clip_id"].to_pylist(), dtype=object)
    dup = ~first
    return t["gidx"].to_numpy()[dup], clip_ids[best_pos][dup], int(first.sum())


# ---------------------------------------------------------------------------------------------------------
# Atomic rewrite of clip shards
# ---------------------------------------------------------------------------------------------------------

def _clips_path(out: Path, rec: CommitRecord) -> Path:
    path = out / rec.files["clips"].path
    if not path.exists():
        raise DatasetError(f"{path} is named by commit record {rec.shard} but missing; the dataset is damaged "
                           f"(restore the file, or remove _commits/{rec.shard}.json to drop the shard)")
    return path


def _next_name(rel: str) -> str:
    """clips/part-00003.parquet -> clips/part-00003.r1.parquet; clips/part-00003.r1.parquet -> .r2."""
    parent, _, name = rel.rpartition("/")
    m = _REVISION.match(name)
    if m:
        new = f"{m.group(1)}.r{int(m.group(2)) + 1}.parquet"
    else:
        m = _ORIGINAL.match(name)
        if not m:
            raise DatasetError(f"unexpected clip shard name {rel!r} in a commit record")
        new = f"{m.group(1)}.r1.parquet"
    return f"{parent}/{new}" if parent else new


def _remove_leftovers(out: Path, records: list[CommitRecord]) -> int:
    """Delete clip files an interrupted dedup left: unreferenced rewrites and replaced originals."""
    referenced = {r.files["clips"].path for r in records}
    by_shard = {r.shard: r.files["clips"].path for r in records}
    removed = 0
    cdir = out / "clips"
    if not cdir.is_dir():
        return 0
    for p in sorted(cdir.iterdir()):
        rel = f"clips/{p.name}"
        rev, orig = _REVISION.match(p.name), _ORIGINAL.match(p.name)
        stale = (rev is not None and rel not in referenced) or (
            orig is not None and orig.group(1) in by_shard and by_shard[orig.group(1)] != rel)
        if stale:
            log.info("dedup: removing %s left by an interrupted dedup", rel)
            p.unlink()
            removed += 1
    if removed:
        fsync_dir(cdir)
    return removed


def _write_back(out: Path, records: list[CommitRecord], sizes: list[int], gidx: np.ndarray,
                target: np.ndarray, progress: Progress | None) -> int:
    """Rewrite each clip shard whose duplicate_of values change; returns how many were rewritten."""
    rewritten = 0
    off = 0
    for i, (rec, n) in enumerate(zip(records, sizes, strict=True)):
        lo, hi = np.searchsorted(gidx, [off, off + n])
        values: list[str | None] = [None] * n
        for g, t in zip(gidx[lo:hi].tolist(), target[lo:hi].tolist(), strict=True):
            values[g - off] = t
        off += n
        path = _clips_path(out, rec)
        names = pq.read_schema(path).names
        old = pq.read_table(path, columns=[DUPLICATE_OF])[DUPLICATE_OF].to_pylist() if DUPLICATE_OF in names \
            else [None] * n
        if old != values:
            _rewrite_shard(out, rec, pa.array(values, pa.string()))
            rewritten += 1
        if progress:
            progress("write", i + 1, len(records))
    return rewritten


def _rewrite_shard(out: Path, rec: CommitRecord, dup: pa.Array) -> None:
    """Replace the shard's `duplicate_of` column (see `rewrite_clip_columns`)."""
    rewrite_clip_columns(out, rec, {DUPLICATE_OF: dup}, command=f"clipmill dedup {out}")


def rewrite_clip_columns(out: str | os.PathLike, rec: CommitRecord, columns: dict[str, pa.Array], *,
                         command: str = "the same command") -> CommitRecord:
    """Atomically replace (or add) columns of one committed clip shard; every other column is copied unchanged.

    New file `clips/part-NNNNN.rK.parquet` (fsynced) -> commit record replaced atomically (the switch) -> old
    file deleted. A crash leaves either the old or the new shard committed; `remove_rewrite_leftovers` (run by
    the next rewriter) deletes the other file. The caller must hold OUT's write lock (a ShardWriter). Arrays
    must have the shard's row count and are cast to the schema's type when the column is in CLIPS_SCHEMA.
    Raises DatasetError (naming `command` to run again) when the disk refuses the write; the shard is then
    unchanged. Returns the new commit record.
    """
    from clipmill.storage.schema import CLIPS_SCHEMA  # noqa: PLC0415

    out = Path(out)
    old_rel = rec.files["clips"].path
    new_rel = _next_name(old_rel)
    old_path, new_path = out / old_rel, out / new_rel
    table = pq.read_table(old_path)
    for name, values in columns.items():
        if len(values) != table.num_rows:
            raise ValueError(f"column {name}: {len(values)} values for a shard of {table.num_rows} rows")
        if name in CLIPS_SCHEMA.names:
            values = values.cast(CLIPS_SCHEMA.field(name).type)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), pa.field(name, values.type), values)
        else:
            table = table.append_column(pa.field(name, values.type), values)
    tmp = new_path.with_name(f".{new_path.name}.tmp")
    record = out / COMMITS / f"{rec.shard}.json"
    try:
        write_parquet_durable(table, tmp)
        os.replace(tmp, new_path)
        fsync_dir(new_path.parent)
        files = dict(rec.files)
        files["clips"] = ShardFile(new_rel, file_sha256(new_path), new_path.stat().st_size, table.num_rows)
        new_rec = replace(rec, files=files)
        write_json_atomic(record, new_rec.to_json())  # the switch
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        new_path.unlink(missing_ok=True)
        record.with_name(f".{record.name}.tmp").unlink(missing_ok=True)
        raise DatasetError(
            f"could not rewrite {old_rel}: {exc.strerror or exc}; the dataset is unchanged for this shard. "
            f"Free space and run `{command}` again"
        ) from exc
    _delete_replaced(old_path)
    return new_rec


def remove_rewrite_leftovers(out: str | os.PathLike, records: list[CommitRecord] | None = None) -> int:
    """Delete clip files an interrupted shard rewrite left (see `rewrite_clip_columns`); returns how many.

    The caller must hold OUT's write lock. `records` defaults to the dataset's commit records.
    """
    out = Path(out)
    records = [r for r in (records if records is not None else read_commits(out)) if "clips" in r.files]
    return _remove_leftovers(out, records)


def _delete_replaced(path: Path) -> None:
    path.unlink()
    fsync_dir(path.parent)


def iter_array_batches(x: np.ndarray, batch: int = 65536) -> Iterator[np.ndarray]:
    """Batches of rows of an in-memory array (a convenience input for `find_duplicates`)."""
    for s in range(0, len(x), batch):
        yield x[s:s + batch]
