"""Deterministic identifiers: `video_id` from content, `clip_id` from video_id + frame span.

Re-running the same input gives the same ids. `video_id` hashes the file size and sampled bytes (head,
tail and evenly spaced blocks) so that it is cheap on large or remote files; `full=True` hashes every byte.
It does not look at the path: the same bytes under two names share one id.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

SAMPLE_BLOCK = 64 * 1024
SAMPLE_BLOCKS = 16


def video_id_from_file(f: BinaryIO, size: int, *, full: bool = False) -> str:
    """Content id of an open, seekable binary file of `size` bytes: 16 hex digits of BLAKE2b."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(size).encode())
    if full or size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    else:
        step = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * step)
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def video_id_from_path(path: str, *, full: bool = False) -> str:
    """Content id of a local file (see `video_id_from_file`)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        return video_id_from_file(f, size, full=full)


def clip_id(video_id: str, start_frame: int, end_frame: int) -> str:
    """Clip id: `<video_id>-<start_frame>-<end_frame>` (half-open frame span, zero-padded)."""
    return f"{video_id}-{int(start_frame):07d}-{int(end_frame):07d}"
