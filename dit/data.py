"""Training data of the DiT: committed shards -> decoded clips -> (frames, height, width) buckets -> batches.

`load_clips` reads the kept clips that carry MP4 bytes from a dataset's committed shards (optionally narrowed by
a DuckDB WHERE over the `clips` view) with the text column(s) to train on. `plan_buckets` gives every clip the
bucket nearest its native aspect ratio and length: a fixed set of aspect ratios at about `size * size` pixels
(multiples of the patch times the autoencoder's downsampling) and frame counts of 1, 1/2 or 1/4 of the preset's
clip length, so nothing is cropped to one square shape. `ClipDataset` decodes a clip's MP4 bytes with PyAV,
picks a window of the bucket's length (at `frame_stride`), resizes to cover the bucket and centre-crops the
little that is left; decoded clips are cached in memory up to a budget. `BucketBatchSampler` yields batches
drawn from one bucket at a time, shuffled per epoch from a seed, split across ranks, with a resumable position.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("prompt_long", "prompt_short", "caption", "source_caption")
ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


class DataError(RuntimeError):
    """The training data cannot be read or is empty; the message says what to change."""


def parse_text_spec(spec: str) -> list[tuple[str, float]]:
    """``"prompt_long"`` or ``"prompt_long:0.7,caption:0.3"`` -> [(column, weight)] with weights summing to 1."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in TEXT_COLUMNS:
            raise DataError(f"text column {name!r} unknown; allowed: {', '.join(TEXT_COLUMNS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise DataError(f"text weight {weight!r} of {name} is not a number (use e.g. prompt_long:0.7)") from None
        if not (w > 0 and math.isfinite(w)):
            raise DataError(f"text weight of {name} must be positive, got {weight}")
        parts.append((name, w))
    total = sum(w for _, w in parts)
    return [(n, w / total) for n, w in parts]


@dataclass
class Clip:
    """One training clip: its id, MP4 bytes, native shape and the texts it may be trained with."""

    clip_id: str
    media: bytes
    width: int
    height: int
    n_frames: int
    fps: float
    texts: dict[str, str]


def load_clips(dataset: str | os.PathLike, text_spec: str, where: str | None = None) -> list[Clip]:
    """Kept clips with media and at least one of the chosen text columns, in clip_id order.

    Raises DataError when the dataset cannot be read, the WHERE is invalid, or no clip qualifies.
    """
    from clipmill.storage.query import QueryError, run_query  # noqa: PLC0415

    columns = [c for c, _ in parse_text_spec(text_spec)]
    text_sql = " OR ".join(f"({c} IS NOT NULL AND length(trim({c})) > 0)" for c in columns)
    sql = (f"SELECT clip_id, media, width, height, n_frames, fps, {', '.join(columns)} FROM clips "
           f"WHERE kept AND media IS NOT NULL AND ({text_sql})")
    if where:
        sql += f" AND ({where})"
    sql += " ORDER BY clip_id"
    try:
        table = run_query(dataset, sql)
    except QueryError as exc:
        raise DataError(f"cannot read training clips from {dataset}: {str(exc).splitlines()[0]}") from exc
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"no kept clips with media and a non-empty {' or '.join(columns)} in {dataset}"
                        + (f" matching WHERE {where}" if where else "")
                        + "; choose another --text column or --where")
    return [Clip(r["clip_id"], r["media"], int(r["width"]), int(r["height"]), int(r["n_frames"]),
                 float(r["fps"] or 0.0), {c: r[c] for c in columns if r[c] and r[c].strip()}) for r in rows]


def bucket_shapes(size: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) pixel shapes of about size*size pixels for each aspect in ASPECTS, multiples of `multiple`."""
    shapes = []
    for aspect in ASPECTS:
        h = max(multiple, round(size / math.sqrt(aspect) / multiple) * multiple)
        w = max(multiple, round(size * size / h / multiple) * multiple)
        if (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def frame_options(frames: int, t_multiple: int, pixel_frames) -> list[int]:
    """Pixel frame counts a bucket may have: the latent length of `frames`, its half and quarter, rounded down to
    multiples of `t_multiple` latent frames; `pixel_frames` maps latent to pixel frames. Longest first."""
    out = []
    for latent in (frames, frames // 2, frames // 4):
        latent = latent // t_multiple * t_multiple
        if latent >= 1 and pixel_frames(latent) not in out:
            out.append(pixel_frames(latent))
    return out


def plan_buckets(clips: list[Clip], *, size: int, frames: int, multiple: int, t_multiple: int = 1,
                 frame_stride: int = 1, pixel_frames=lambda n: n,
                 latent_frames=lambda n: n) -> tuple[list[tuple[int, int, int] | None], dict[str, int]]:
    """Bucket (frames, height, width) per clip (None when it is too short for the smallest bucket) and counts."""
    shapes = bucket_shapes(size, multiple)
    options = frame_options(latent_frames(frames), t_multiple, pixel_frames)
    buckets: list[tuple[int, int, int] | None] = []
    too_short = 0
    for clip in clips:
        aspect = clip.width / max(1, clip.height)
        h, w = min(shapes, key=lambda s: abs(math.log(s[1] / s[0]) - math.log(aspect)))
        fits = [f for f in options if (f - 1) * frame_stride + 1 <= clip.n_frames]
        if not fits:
            buckets.append(None)
            too_short += 1
            continue
        buckets.append((fits[0], h, w))
    counts: dict[str, int] = {}
    for b in buckets:
        if b is not None:
            key = "x".join(map(str, b))
            counts[key] = counts.get(key, 0) + 1
    if too_short:
        log.warning("%d clip(s) shorter than %d frames (stride %d) are skipped", too_short, options[-1],
                    frame_stride)
    return buckets, counts


def decode_mp4(media: bytes) -> np.ndarray:
    """All frames of an MP4 as uint8 (T, H, W, 3) RGB."""
    import av  # noqa: PLC0415

    try:
        with av.open(io.BytesIO(media)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise DataError(f"cannot decode clip media: {exc}") from exc
    if not frames:
        raise DataError("clip has no decodable frames")
    return np.stack(frames)


def fit_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (T, H, W, 3) frames to cover (height, width) keeping the aspect ratio, then centre-crop."""
    import cv2  # noqa: PLC0415

    _, h, w, _ = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    y0, x0 = (nh - height) // 2, (nw - width) // 2
    return np.stack([cv2.resize(f, (nw, nh), interpolation=interp)[y0:y0 + height, x0:x0 + width] for f in video])


class ClipDataset:
    """Decoded, bucket-shaped clips: ``dataset[i, epoch]`` -> (uint8 (T, H, W, 3) frames, text).

    The frame window start and the text column (for mixed columns) are drawn from a generator seeded by
    (seed, epoch, clip index), so a resumed run sees exactly the same samples.
    """

    def __init__(self, clips: list[Clip], buckets, text_spec: str, *, frame_stride: int = 1, seed: int = 0,
                 cache_mb: float = 2048):
        self.clips, self.buckets = clips, buckets
        self.text_spec = parse_text_spec(text_spec)
        self.frame_stride, self.seed = frame_stride, seed
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 2**20)

    def _shaped(self, i: int) -> np.ndarray:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        _, h, w = self.buckets[i]
        try:
            video = fit_frames(decode_mp4(self.clips[i].media), h, w)
        except DataError as exc:
            raise DataError(f"clip {self.clips[i].clip_id}: {exc}; run `clipmill verify` on the dataset") from exc
        self.cache[i] = video
        self.cache_bytes += video.nbytes
        while self.cache_bytes > self.cache_limit and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.nbytes
        return video

    def text(self, i: int, rng: np.random.Generator) -> str:
        texts = self.clips[i].texts
        names = [n for n, _ in self.text_spec if n in texts]
        weights = np.array([w for n, w in self.text_spec if n in texts])
        return texts[names[int(rng.choice(len(names), p=weights / weights.sum()))]]

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, str]:
        i, epoch = key
        rng = np.random.default_rng((self.seed, epoch, i))
        frames = self.buckets[i][0]
        video = self._shaped(i)
        span = (frames - 1) * self.frame_stride + 1
        if video.shape[0] < span:  # the container held fewer frames than its n_frames said
            idx = np.minimum(np.arange(frames) * self.frame_stride, video.shape[0] - 1)
        else:
            start = int(rng.integers(0, video.shape[0] - span + 1))
            idx = start + np.arange(frames) * self.frame_stride
        return video[idx], self.text(i, rng)


class BucketBatchSampler:
    """Batches of clip indices, each from one bucket; every clip at most once per epoch; resumable.

    Per epoch the indices of each bucket are shuffled (seeded by (seed, epoch)) and cut into batches of at most
    `batch_size`; the batches are shuffled and dealt round-robin to `world_size` ranks, each rank getting the
    same number. `state()` / `load_state()` give the (epoch, position) to continue from.
    """

    def __init__(self, buckets, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(buckets):
            if b is not None:
                self.groups.setdefault(tuple(b), []).append(i)
        if not self.groups:
            raise DataError("no clip fits any bucket (all too short?)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        rng = np.random.default_rng((self.seed, epoch))
        batches = []
        for key in sorted(self.groups):
            idx = rng.permutation(self.groups[key]).tolist()
            batches += [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        order = rng.permutation(len(batches))
        per_rank = len(batches) // self.world_size
        if per_rank == 0:
            raise DataError(f"{len(batches)} batch(es) per epoch cannot feed {self.world_size} workers; "
                            f"lower --batch-size or --num-workers")
        mine = order[self.rank::self.world_size][:per_rank]
        return [batches[j] for j in mine]

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        """Endless (epoch, batch) pairs from the current position on."""
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield self.epoch, batch
            self.epoch, self.position = self.epoch + 1, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
