"""Transcode stage: cut each clip, frame-exactly, into its own small H.264 MP4 (bytes in the row).

One row per clip (level "clip"). Reads `uri`, `start_frame`, `end_frame` (half-open, 0-based decode-order
indices), `start_pts`, `end_pts` (PTS of frames `start_frame` and `end_frame`; `end_pts` NULL when the clip
runs to the end of the stream), `time_base` ("1/12800") and `fps`. Adds `media` (MP4 bytes), `media_codec`
("h264"), `media_sha256`, `clip_width`, `clip_height`, `clip_n_frames` and `clip_duration_s`.

How a clip is cut: seek backward to the keyframe at or before `start_pts`, decode, and keep the frames with
`start_pts <= pts < end_pts`. When seeking misbehaves (the first decoded frame lies after `start_pts`, a
frame has no PTS, PTS go backwards, frame `start_frame` is not at `start_pts` exactly, or the frame count
comes out wrong) it falls back to decoding from the start and counting frames by index, which is the
definition of a frame index (see storage/schema.py). Frames are scaled so the longer side is at most
`max_side` (even sizes, aspect kept), turned upright when the source has a 90/180/270 degree display
rotation, and encoded with libx264 (yuv420p) at a constant frame rate equal to the source fps, into an
MP4 whose index (`moov`) sits before the media data, so it can be streamed.
Audio is not copied. The decoded frames of a clip are reproducible, its bytes are not guaranteed to be:
libx264 in PyAV 18.1 was seen to give slightly different bitstreams for the same input on rare runs,
so `media_sha256` identifies the stored bytes, not the clip (use `clip_id` for that).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, BinaryIO, ClassVar, Literal
from urllib.parse import unquote, urlparse

import av
import numpy as np
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import RowStage, StageConfig
from clipmill.storage import remote

log = logging.getLogger(__name__)

MEDIA = "media"
MEDIA_CODEC = "media_codec"
MEDIA_SHA256 = "media_sha256"
CLIP_WIDTH = "clip_width"
CLIP_HEIGHT = "clip_height"
CLIP_N_FRAMES = "clip_n_frames"
CLIP_DURATION_S = "clip_duration_s"

Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]


class TranscodeConfig(StageConfig):
    """Settings of the transcode stage.

    Args:
        max_side: scale clips so the longer side is at most this many pixels (0 = keep the source size;
            sizes are always rounded down to even numbers, as yuv420p needs).
        crf: libx264 constant rate factor (0 lossless .. 51 worst; 18-23 is visually good).
        preset: libx264 speed/size preset.
        threads: libx264 threads (0 = FFmpeg's choice).
    """

    max_side: int = Field(512, ge=0)
    crf: int = Field(20, ge=0, le=51)
    preset: Preset = "veryfast"
    threads: int = Field(0, ge=0)


@dataclass(frozen=True)
class ClipMedia:
    """One encoded clip: MP4 bytes and what they hold."""

    data: bytes
    codec: str
    sha256: str
    width: int
    height: int
    n_frames: int
    fps: float
    duration_s: float
    used_seek: bool


class _SeekFailed(Exception):
    """Seeking by PTS did not land where it should; the caller decodes from the start instead."""


# --------------------------------------------------------------------------------------------------
# Cutting
# --------------------------------------------------------------------------------------------------


def cut_clip(
    path: str | BinaryIO,
    start_frame: int,
    end_frame: int,
    start_pts: int | None,
    end_pts: int | None,
    time_base: str | Fraction | None,
    fps: float,
    max_side: int = 512,
    crf: int = 20,
    preset: str = "veryfast",
    *,
    threads: int = 0,
) -> ClipMedia:
    """Cut source frames `start_frame <= i < end_frame` of `path` (a path or a seekable binary file object)
    into H.264 MP4 bytes.

    Uses the PTS (`start_pts`, `end_pts` in units of `time_base`) to seek when they are given and
    trustworthy, else decodes from the start and counts frames. Raises ValueError for a bad span and
    RuntimeError when the number of frames written is not `end_frame - start_frame` (a damaged source);
    it does not check that the source is the video the span was computed on.
    """
    if start_frame < 0 or end_frame <= start_frame:
        raise ValueError(f"bad frame span [{start_frame}, {end_frame})")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    expected = end_frame - start_frame
    tb = Fraction(time_base) if time_base else None
    use_seek = start_frame > 0 and start_pts is not None and tb is not None
    if use_seek:
        try:
            media = _cut(path, start_frame, end_frame, start_pts, end_pts, tb, fps, max_side, crf, preset, threads)
            if media.n_frames == expected:
                return media
            log.warning("%s [%d, %d): seeking gave %d frames, decoding from the start instead",
                        path, start_frame, end_frame, media.n_frames)
        except _SeekFailed as exc:
            log.info("%s [%d, %d): %s; decoding from the start instead", path, start_frame, end_frame, exc)
    media = _cut(path, start_frame, end_frame, None, None, None, fps, max_side, crf, preset, threads)
    if media.n_frames != expected:
        raise RuntimeError(f"wrote {media.n_frames} frames for span [{start_frame}, {end_frame}) of {path}, "
                           f"expected {expected}: the source has fewer decodable frames than the span says")
    return media


def _cut(path, start_frame, end_frame, start_pts, end_pts, tb, fps, max_side, crf, preset, threads) -> ClipMedia:
    if hasattr(path, "seek"):  # a file object: every attempt reads from its start
        path.seek(0)
    with av.open(path, mode="r", metadata_errors="ignore") as src:
        if not src.streams.video:
            raise ValueError(f"{path} has no video stream")
        vs = src.streams.video[0]
        vs.thread_type = "AUTO"
        if start_pts is not None:
            frames = _frames_by_pts(src, vs, start_pts, end_pts, tb, end_frame - start_frame)
        else:
            frames = _frames_by_index(src, vs, start_frame, end_frame)
        return _encode(frames, fps, max_side, crf, preset, threads, used_seek=start_pts is not None)


def _frames_by_pts(src, vs, start_pts: int, end_pts: int | None, tb: Fraction, limit: int) -> Iterator:
    """Frames with start_pts <= pts < end_pts after a backward seek; raises _SeekFailed when unsure."""
    if vs.time_base and tb != vs.time_base:  # the row's PTS are in another time base: rescale
        start_pts = int(round(start_pts * tb / vs.time_base))
        end_pts = None if end_pts is None else int(round(end_pts * tb / vs.time_base))
    src.seek(start_pts, stream=vs, backward=True, any_frame=False)
    prev = None
    kept = 0
    for frame in src.decode(vs):
        pts = frame.pts
        if pts is None:
            raise _SeekFailed("a frame has no PTS")
        if prev is None and pts > start_pts:
            raise _SeekFailed(f"seek landed after the start (first PTS {pts} > {start_pts})")
        if prev is not None and pts <= prev:
            raise _SeekFailed(f"PTS not increasing ({prev} then {pts})")
        prev = pts
        if pts < start_pts:
            continue
        if kept == 0 and pts != start_pts:
            raise _SeekFailed(f"no frame at start PTS {start_pts} (next is {pts})")
        if (end_pts is not None and pts >= end_pts) or kept >= limit:
            return
        kept += 1
        yield frame


def _frames_by_index(src, vs, start_frame: int, end_frame: int) -> Iterator:
    """Frames start_frame <= i < end_frame, counting every decoded frame from the start of the stream."""
    for i, frame in enumerate(src.decode(vs)):
        if i >= end_frame:
            return
        if i >= start_frame:
            yield frame


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Output (width, height): longer side <= max_side (0 = no limit), aspect kept, both even and >= 2."""
    scale = 1.0
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
    w = max(2, int(round(width * scale)) // 2 * 2)
    h = max(2, int(round(height * scale)) // 2 * 2)
    return w, h


def _encode(frames: Iterator, fps: float, max_side: int, crf: int, preset: str, threads: int,
            used_seek: bool) -> ClipMedia:
    """Encode decoded frames to H.264 MP4 bytes at a constant `fps` (pts 0..n-1)."""
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    n = 0
    width = height = 0
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        quarter_turns = 0
        for frame in frames:
            if stream is None:
                quarter_turns = _quarter_turns(frame)
                sw, sh = (frame.height, frame.width) if quarter_turns % 2 else (frame.width, frame.height)
                width, height = target_size(sw, sh, max_side)
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.codec_context.time_base = 1 / rate
                opts = {"crf": str(crf), "preset": preset}
                if threads:
                    opts["threads"] = str(threads)
                stream.options = opts
            if quarter_turns:
                pre_w, pre_h = (height, width) if quarter_turns % 2 else (width, height)
                rgb = frame.reformat(width=pre_w, height=pre_h, format="rgb24",
                                     interpolation="AREA").to_ndarray()
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(rgb, quarter_turns)),
                                                format="rgb24").reformat(format="yuv420p")
            else:
                vf = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            vf.pts = n
            vf.time_base = 1 / rate
            vf.pict_type = av.video.frame.PictureType.NONE  # never force the source's frame types
            for packet in stream.encode(vf):
                out.mux(packet)
            n += 1
        if stream is not None:
            for packet in stream.encode(None):
                out.mux(packet)
    if n == 0:
        return ClipMedia(b"", "h264", "", 0, 0, 0, float(rate), 0.0, used_seek)
    data = faststart(buf.getvalue())
    return ClipMedia(data=data, codec="h264", sha256=hashlib.sha256(data).hexdigest(), width=width,
                     height=height, n_frames=n, fps=float(rate), duration_s=n / float(rate), used_seek=used_seek)


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that make a frame upright (0 unless a 90/180/270 display matrix)."""
    rot = int(round(frame.rotation or 0)) % 360
    if rot % 90:
        log.warning("display rotation %d degrees is not a multiple of 90; ignored", rot)
        return 0
    return rot // 90


# --------------------------------------------------------------------------------------------------
# MP4 "faststart": move the moov box in front of the media data
# --------------------------------------------------------------------------------------------------

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _boxes(data: bytes | bytearray, start: int, end: int) -> Iterator[tuple[bytes, int, int, int]]:
    """(type, box start, payload start, box end) of each box in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"bad MP4 box {kind!r} at {pos} (size {size})")
        yield kind, pos, pos + header, pos + size
        pos += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, shift: int) -> None:
    for kind, _, payload, box_end in _boxes(moov, start, end):
        if kind in _CONTAINER_BOXES:
            _shift_chunk_offsets(moov, payload, box_end, shift)
        elif kind in (b"stco", b"co64"):
            count = struct.unpack(">I", moov[payload + 4 : payload + 8])[0]
            dtype = ">u4" if kind == b"stco" else ">u8"
            first = payload + 8
            last = first + count * np.dtype(dtype).itemsize
            offsets = np.frombuffer(bytes(moov[first:last]), dtype=dtype).astype(np.uint64) + np.uint64(shift)
            if kind == b"stco" and count and int(offsets.max()) >= 2**32:
                raise ValueError("clip too large for 32-bit chunk offsets after moving moov")
            moov[first:last] = offsets.astype(dtype).tobytes()


def faststart(data: bytes) -> bytes:
    """MP4 bytes with the `moov` box moved before the first `mdat` (chunk offsets patched), like
    FFmpeg's `-movflags +faststart`, which PyAV cannot apply to an in-memory output.

    Returns `data` unchanged when `moov` already comes first. Handles plain (non-fragmented) MP4 only.
    """
    boxes = list(_boxes(data, 0, len(data)))
    kinds = [b[0] for b in boxes]
    if b"moov" not in kinds or b"mdat" not in kinds:
        raise ValueError("not a plain MP4 (needs moov and mdat boxes)")
    i_moov, i_mdat = kinds.index(b"moov"), kinds.index(b"mdat")
    if i_moov < i_mdat:
        return data
    _, m_start, m_payload, m_end = boxes[i_moov]
    moov = bytearray(data[m_start:m_end])
    _shift_chunk_offsets(moov, m_payload - m_start, len(moov), len(moov))
    parts = [data[b[1] : b[3]] for b in boxes[:i_mdat]]
    parts.append(bytes(moov))
    parts += [data[b[1] : b[3]] for j, b in enumerate(boxes[i_mdat:], start=i_mdat) if j != i_moov]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


def _local_path(uri: str) -> str:
    """Local path of a plain path or `file://` URL (stages do not import each other, so not probe's)."""
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL with a remote host is not supported: {uri!r}")
        return unquote(parsed.path, errors="surrogateescape")  # %XX of a non-UTF-8 file name: the same bytes
    if "://" in uri:
        raise ValueError(f"transcode reads local paths or file:// URLs, got {uri!r}")
    return uri


class Transcode(RowStage):
    """Cut each clip row to its own H.264 MP4 (`media` bytes) with `cut_clip`; frame-exact.

    Raises (so the row gets an `error`) when the clip cannot be cut to exactly `end_frame - start_frame`
    frames. Does not copy audio, subtitles or metadata; does not keep the source codec.
    """

    name: ClassVar[str] = "transcode"
    Config: ClassVar[type[StageConfig]] = TranscodeConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ("uri", "start_frame", "end_frame", "start_pts", "end_pts",
                                        "time_base", "fps")
    adds: ClassVar[dict[str, pa.DataType]] = {
        MEDIA: pa.binary(),
        MEDIA_CODEC: pa.string(),
        MEDIA_SHA256: pa.string(),
        CLIP_WIDTH: pa.int32(),
        CLIP_HEIGHT: pa.int32(),
        CLIP_N_FRAMES: pa.int64(),
        CLIP_DURATION_S: pa.float64(),
    }
    batch_size: ClassVar[int] = 4

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg: TranscodeConfig = self.cfg  # type: ignore[assignment]
        uri = row["uri"]
        with contextlib.ExitStack() as stack:
            # a remote source is one fsspec file object (block cache) for all the decodes of this clip
            src = stack.enter_context(remote.opened(uri)) if remote.is_remote(uri) else _local_path(uri)
            media = cut_clip(src, int(row["start_frame"]), int(row["end_frame"]), row.get("start_pts"),
                             row.get("end_pts"), row.get("time_base"), float(row["fps"]), cfg.max_side, cfg.crf,
                             cfg.preset, threads=cfg.threads)
        return dict(row, **{MEDIA: media.data, MEDIA_CODEC: media.codec, MEDIA_SHA256: media.sha256,
                            CLIP_WIDTH: media.width, CLIP_HEIGHT: media.height, CLIP_N_FRAMES: media.n_frames,
                            CLIP_DURATION_S: media.duration_s})
