"""The on-disk contract: Arrow schemas of `videos/` and `clips/` shards, and the schema version.

Every writer and reader in clipmill takes its columns from here and nowhere else. The version is
`MAJOR.MINOR`: a MINOR bump only adds nullable columns (old datasets stay readable, missing columns read
as NULL); a MAJOR bump changes or removes columns, and a dataset of another MAJOR is refused.

Frame spans are half-open: a clip covers source frames `start_frame <= i < end_frame` (0-based, decode
order, counted from the first decoded video frame whatever its PTS), and `start_s = start_frame / fps`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.2"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])

# videos.status values
STATUS_DONE = "done"
STATUS_REJECTED = "rejected"
STATUS_FAILED = "failed"
STATUSES = (STATUS_DONE, STATUS_REJECTED, STATUS_FAILED)

SPAN = pa.struct([("first", pa.int64()), ("last", pa.int64()), ("reason", pa.string())])

VIDEO_FIELDS: list[pa.Field] = [
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("container", pa.string()),
    pa.field("codec", pa.string()),
    pa.field("pix_fmt", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("fps", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("rotation", pa.int32()),
    pa.field("n_frames", pa.int64()),
    pa.field("has_audio", pa.bool_()),
    pa.field("source_caption", pa.string()),
    pa.field("detector", pa.string()),
    pa.field("cuts", pa.list_(pa.int64())),
    pa.field("transitions", pa.list_(pa.list_(pa.int64()))),
    pa.field("skipped_spans", pa.list_(SPAN)),
    pa.field("n_clips", pa.int32()),
    pa.field("n_kept", pa.int32()),
    pa.field("committed_at", pa.timestamp("ms", tz="UTC")),
]

CLIP_FIELDS: list[pa.Field] = [
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("clip_index", pa.int32()),
    pa.field("start_frame", pa.int64()),
    pa.field("end_frame", pa.int64()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("duration_s", pa.float64()),
    pa.field("n_frames", pa.int64()),
    pa.field("fps", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("aspect_bucket", pa.string()),
    # basic quality (stages/quality.py)
    pa.field("brightness", pa.float32()),
    pa.field("contrast", pa.float32()),
    pa.field("sharpness", pa.float32()),
    pa.field("black_fraction", pa.float32()),
    pa.field("frame_diff", pa.float32()),
    pa.field("static", pa.bool_()),
    # technical quality beyond the basics (1.1)
    pa.field("brisque", pa.float32()),
    pa.field("blockiness", pa.float32()),
    pa.field("exposure", pa.float32()),
    pa.field("letterbox", pa.list_(pa.int32())),
    pa.field("slideshow", pa.bool_()),
    # motion (stages/motion.py, 1.1)
    pa.field("motion_score", pa.float32()),
    pa.field("camera_motion", pa.string()),
    # on-screen text (stages/ocr.py, 1.1)
    pa.field("text_area", pa.float32()),
    pa.field("ocr_text", pa.string()),
    # safety (stages/safety.py, 1.1)
    pa.field("nsfw_score", pa.float32()),
    # aesthetics and embeddings (stages/aesthetics.py, stages/embedding.py, 1.1)
    pa.field("aesthetic_score", pa.float32()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("embedding_model", pa.string()),
    # near-duplicates (storage/dedup.py, 1.1): clip_id of the best member of this clip's duplicate group
    pa.field("duplicate_of", pa.string()),
    # filter (stages/filter.py)
    pa.field("kept", pa.bool_()),
    pa.field("reject_reasons", pa.list_(pa.string())),
    # text (stages/caption.py, stages/expand.py; clipmill caption OUT rewrites them)
    pa.field("source_caption", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("caption_error", pa.string()),  # 1.2: why captioning failed (NULL when it did not)
    pa.field("dominant_colors", pa.list_(pa.string())),  # 1.2: palette names (recaption/facts.py)
    pa.field("prompt_short", pa.string()),
    pa.field("prompt_long", pa.string()),
    pa.field("prompt_model", pa.string()),
    pa.field("prompt_error", pa.string()),  # 1.2: why prompt expansion failed
    # media
    pa.field("thumbnail", pa.binary()),
    pa.field("media", pa.binary()),
    pa.field("media_codec", pa.string()),
    pa.field("media_sha256", pa.string()),
]

VIDEOS_SCHEMA = pa.schema(VIDEO_FIELDS, metadata={"clipmill.schema_version": SCHEMA_VERSION, "table": "videos"})
CLIPS_SCHEMA = pa.schema(CLIP_FIELDS, metadata={"clipmill.schema_version": SCHEMA_VERSION, "table": "clips"})

VIDEO_COLUMNS = tuple(f.name for f in VIDEO_FIELDS)
CLIP_COLUMNS = tuple(f.name for f in CLIP_FIELDS)


def schema_major(version: str) -> int:
    """Major part of a `MAJOR.MINOR` schema version string; ValueError when it is not one."""
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise ValueError(f"not a schema version: {version!r} (expected MAJOR.MINOR)") from exc


def aspect_bucket(width: int, height: int) -> str:
    """Name of the nearest standard aspect-ratio bucket for a frame size, e.g. '16:9', '9:16', '1:1'."""
    if not width or not height:
        return "unknown"
    ratio = width / height
    buckets = {"21:9": 21 / 9, "2:1": 2.0, "16:9": 16 / 9, "3:2": 1.5, "4:3": 4 / 3, "5:4": 1.25, "1:1": 1.0,
               "4:5": 0.8, "3:4": 0.75, "2:3": 2 / 3, "9:16": 9 / 16, "1:2": 0.5}
    return min(buckets, key=lambda k: abs(buckets[k] - ratio) / buckets[k])
