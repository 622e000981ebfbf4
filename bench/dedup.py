"""Benchmark of near-duplicate finding (storage.dedup.find_duplicates): time, peak RSS, recall, growth.

Data: synthetic unit vectors (128-dim by default). 95% are "originals", 5% are planted near copies of a
random original (x + sigma * noise, sigma uniform in [0.02, 0.25], i.e. cosine ~0.96-0.9998). Two layouts:
  * uniform:    originals spread over the whole sphere (unrelated clips are far apart),
  * clustered:  originals around 1/100 as many centres at cosine ~0.75 to their centre (many similar but
                distinct shots: bigger LSH buckets, the harder case for the method's cost).

Measured in one run, each size in its own subprocess (so peak RSS is that size's own):
  * find_duplicates end to end (spill to a temp dir, LSH, exact compare, union-find),
  * the reference: exact all-pairs cosine in blocks + the same union-find (up to --brute-max clips),
  * recall of planted pairs, and agreement with the exact groups where the reference ran,
  * growth ratios of time against the count (10x more clips: 10x = linear, 100x = quadratic).

Prints a table, then as the LAST line one JSON object with every figure; results also go to
bench/results/dedup.json. Run: .venv/bin/python bench/dedup.py [--sizes 1000 10000 100000] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dedup.json"
THRESHOLD = 0.95


def make_data(n: int, dim: int, layout: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, planted source indices, planted copy indices)."""
    rng = np.random.default_rng(seed)
    n_copies = n // 20
    n_orig = n - n_copies
    if layout == "uniform":
        x = rng.standard_normal((n_orig, dim)).astype(np.float32)
    else:
        centres = rng.standard_normal((max(1, n_orig // 100), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        noise = rng.standard_normal((n_orig, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x = 0.75 * centres[rng.integers(0, len(centres), n_orig)] + 0.66 * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n_orig, n_copies, replace=False)
    sigma = rng.uniform(0.02, 0.25, (n_copies, 1)).astype(np.float32)
    y = x[src] + sigma * rng.standard_normal((n_copies, dim)).astype(np.float32) / np.sqrt(dim)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return np.vstack([x, y]), src, n_orig + np.arange(n_copies)


def brute_labels(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """Exact groups: all pairs in blocks, then the same vectorised union-find as the library."""
    from clipmill.storage.dedup import _find, _union

    n = len(x)
    parent = np.arange(n, dtype=np.int64)
    for r0 in range(0, n, block):
        sim = x[r0:r0 + block] @ x[r0:].T
        a, b = np.nonzero(sim >= threshold)
        keep = r0 + a < r0 + b
        if keep.any():
            _union(parent, (r0 + a[keep]).astype(np.int64), (r0 + b[keep]).astype(np.int64))
    return _find(parent, np.arange(n))


def one(n: int, dim: int, layout: str, brute: bool) -> dict:
    """Measure one size in this process (run as a subprocess by main)."""
    from clipmill.storage.dedup import find_duplicates, iter_array_batches

    x, src, cp = make_data(n, dim, layout)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    secs = float("inf")
    for _ in range(3 if n <= 10_000 else 1):  # best of 3 where cheap: the machine is shared
        t0 = time.perf_counter()
        run = find_duplicates(iter_array_batches(x, 8192), threshold=THRESHOLD)
        if time.perf_counter() - t0 < secs:
            secs, res = time.perf_counter() - t0, run  # phases of the best run
    planted_cos = (x[src] * x[cp]).sum(axis=1)
    above = planted_cos >= THRESHOLD
    row = {
        "n": n, "dim": dim, "layout": layout, "seconds": round(secs, 3),
        "phase_seconds": {k: round(v, 3) for k, v in res.seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": round(rss0, 1), "data_mb": round(x.nbytes / 2**20, 1),
        "bands": res.plan.bands, "bits": res.plan.bits, "largest_bucket": res.largest_bucket,
        "candidate_pairs": res.candidate_pairs, "pairs_per_clip": round(res.candidate_pairs / n, 1),
        "planted": len(src), "planted_above_threshold": int(above.sum()),
        "planted_min_cosine": round(float(planted_cos.min()), 4),
        "planted_recall": round(float((res.labels[src] == res.labels[cp])[above].mean()), 5),
        "groups": res.n_groups, "duplicates": res.n_duplicates,
    }
    if brute:
        t0 = time.perf_counter()
        exact = brute_labels(x, THRESHOLD)
        row["brute_seconds"] = round(time.perf_counter() - t0, 3)
        row["speedup_vs_brute"] = round(row["brute_seconds"] / secs, 2)
        row["clips_grouped_as_exact"] = round(float((exact == res.labels).mean()), 6)
        row["exact_duplicates"] = int((exact != np.arange(n)).sum())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layouts", nargs="+", default=["uniform", "clustered"])
    ap.add_argument("--brute-max", type=int, default=10000, help="run the exact reference up to this size")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="uniform", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.dim, args.layout, args.one <= args.brute_max)))
        return

    rows = []
    for layout in args.layouts:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--layout", layout,
                   "--brute-max", str(args.brute_max)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {layout:9s} n={n:>7d}  {r['seconds']:7.2f}s  rss {r['peak_rss_mb']:6.0f} MB  "
                  f"recall {r['planted_recall']:.4f}", file=sys.stderr)

    growth = {}
    for layout in args.layouts:
        rs = [r for r in rows if r["layout"] == layout]
        for a, b in zip(rs, rs[1:], strict=False):
            growth[f"{layout} {a['n']}->{b['n']}"] = {
                "count_ratio": round(b["n"] / a["n"], 1),
                "time_ratio": round(b["seconds"] / max(a["seconds"], 1e-9), 2),
                "candidate_pairs_ratio": round(b["candidate_pairs"] / max(a["candidate_pairs"], 1), 2),
            }

    head = (f"{'layout':9s} {'n':>7s} {'seconds':>8s} {'lsh':>6s} {'cmp':>6s} {'rss MB':>7s} {'bands x bits':>12s} "
            f"{'pairs/clip':>10s} {'max bkt':>7s} {'recall':>7s} {'brute s':>8s} {'speedup':>7s} {'=exact':>7s}")
    print(f"find_duplicates, threshold {THRESHOLD}, dim {args.dim}, 5% planted copies")
    print(head)
    print("-" * len(head))
    for r in rows:
        ph = r["phase_seconds"]
        print(f"{r['layout']:9s} {r['n']:7d} {r['seconds']:8.2f} {ph.get('lsh', 0):6.2f} {ph.get('compare', 0):6.2f} "
              f"{r['peak_rss_mb']:7.0f} {str(r['bands']) + ' x ' + str(r['bits']):>12s} {r['pairs_per_clip']:10.1f} "
              f"{r['largest_bucket']:7d} {r['planted_recall']:7.4f} "
              f"{r.get('brute_seconds', float('nan')):8.2f} {r.get('speedup_vs_brute', float('nan')):7.2f} "
              f"{r.get('clips_grouped_as_exact', float('nan')):7.4f}")
    print("\ngrowth (10x clips: time ratio 10 = linear, 100 = quadratic)")
    for k, g in growth.items():
        print(f"  {k:24s} time x{g['time_ratio']:<7} candidate pairs x{g['candidate_pairs_ratio']}")

    result = {"bench": "dedup", "threshold": THRESHOLD, "dim": args.dim, "rows": rows, "growth": growth}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
