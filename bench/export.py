"""Export throughput: each `clipmill export` format against a plain copy of the same MP4 bytes.

Data: a dataset committed with the real shard writer (storage.shards.ShardWriter), whose clip rows carry
real H.264 MP4s (generated shots, 384x216 at 25 fps, 2 s each, a few distinct encodes reused under many
clip ids) -- the export code only moves bytes, so how they were made does not matter to it.

Measured in the same run (best of --repeat runs each, after one warm-up read of the shards):
  * reference: read the selected clips' media from the committed shards (the same per-shard Parquet reads
    select does) and write each MP4 to its own file -- the least any export must do;
  * export_dataset() for webdataset, jsonl-mp4 and hf (SQL selection, metadata, tar/Parquet/CSV writing,
    checksums in the index, atomic publish),
as MiB of MP4 per second and as the ratio of each format's time to the reference's (1.0 = as fast as a
plain copy). Prints a table, writes bench/results/export.json, and prints one JSON object as the last line.
Run: .venv/bin/python bench/export.py [--clips 400] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill import synth
from clipmill.storage.export import FORMATS, export_dataset
from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import ShardWriter, read_commits, resolve_file

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLIPS_PER_VIDEO = 8
VIDEOS_PER_SHARD = 10


def make_media(root: Path, n: int = 4) -> list[bytes]:
    """`n` distinct 2 s H.264 MP4s of moving generated shots."""
    out = []
    for i in range(n):
        path = root / f"m{i}.mp4"
        synth.make_shots_video(path, [synth.Shot(50, "pan")], width=384, height=216, seed=i)
        out.append(path.read_bytes())
    return out


def make_dataset(out: Path, n_clips: int, media: list[bytes]) -> int:
    """Commit `n_clips` clip rows (with MP4 bytes) and their video rows; return the MP4 bytes committed."""
    total = 0
    n_videos = (n_clips + CLIPS_PER_VIDEO - 1) // CLIPS_PER_VIDEO
    with ShardWriter(out) as writer:
        for first in range(0, n_videos, VIDEOS_PER_SHARD):
            videos, clips = [], []
            for v in range(first, min(n_videos, first + VIDEOS_PER_SHARD)):
                vid = f"{v:016x}"
                mine = range(v * CLIPS_PER_VIDEO, min(n_clips, (v + 1) * CLIPS_PER_VIDEO))
                videos.append({"video_id": vid, "uri": f"/bench/v{v}.mp4", "status": "done", "fps": 25.0,
                               "width": 384, "height": 216, "n_clips": len(mine), "n_kept": len(mine)})
                for k, c in enumerate(mine):
                    data = media[c % len(media)]
                    total += len(data)
                    clips.append({"clip_id": f"{vid}-{k * 50:07d}-{k * 50 + 50:07d}", "video_id": vid,
                                  "uri": f"/bench/v{v}.mp4", "clip_index": k, "start_frame": k * 50,
                                  "end_frame": k * 50 + 50, "start_s": k * 2.0, "end_s": k * 2.0 + 2.0,
                                  "duration_s": 2.0, "n_frames": 50, "fps": 25.0, "width": 384, "height": 216,
                                  "aspect_bucket": "16:9", "kept": True, "reject_reasons": [],
                                  "sharpness": float(np.float32(100 + c)), "caption": f"clip number {c}",
                                  "media": data, "media_codec": "h264"})
            writer.commit(pa.Table.from_pylist(videos, schema=VIDEOS_SCHEMA),
                          pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA))
    return total


def plain_copy(src: Path, dest: Path) -> int:
    """The reference: every clip's MP4 bytes from the committed shards to its own file."""
    dest.mkdir()
    n = 0
    for rec in read_commits(src):
        table = pq.read_table(resolve_file(src, rec.files["clips"].path), columns=["clip_id", "media"])
        for cid, media in zip(table["clip_id"].to_pylist(), table["media"].to_pylist(), strict=True):
            (dest / f"{cid}.mp4").write_bytes(media)
            n += len(media)
    return n


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipmill-bench-export-") as tmp:
        root = Path(tmp)
        media = make_media(root)
        src = root / "ds"
        nbytes = make_dataset(src, args.clips, media)
        mib = nbytes / 2**20
        counter = iter(range(10**6))

        def fresh(name: str) -> Path:
            path = root / f"{name}-{next(counter)}"
            return path

        def run_copy() -> None:
            d = fresh("copy")
            plain_copy(src, d)
            shutil.rmtree(d)

        def run_format(fmt: str):
            def go() -> None:
                d = fresh(fmt)
                report = export_dataset(src, fmt, d, where="true", shard_mb=64)
                assert report.exported == args.clips, report
                shutil.rmtree(d)
            return go

        run_copy()  # warm-up: shards in the page cache for everyone
        ref = best(run_copy, args.repeat)
        rows = {"plain_copy": ref}
        for fmt in FORMATS:
            rows[fmt] = best(run_format(fmt), args.repeat)
    figures = {"clips": args.clips, "mp4_mib": round(mib, 2), "repeat": args.repeat,
               "seconds": {k: round(v, 4) for k, v in rows.items()},
               "mib_per_s": {k: round(mib / v, 1) for k, v in rows.items()},
               "ratio_to_plain_copy": {k: round(v / ref, 2) for k, v in rows.items() if k != "plain_copy"}}
    print(f"{'what':<12} {'seconds':>8} {'MiB/s':>8} {'x copy':>7}   ({args.clips} clips, {mib:.1f} MiB of MP4)")
    for k, v in rows.items():
        print(f"{k:<12} {v:8.3f} {mib / v:8.1f} {v / ref:7.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
