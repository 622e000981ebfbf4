"""Probe stage: read each input video's container and stream metadata and prove that it decodes.

One row per input video (level "video"). Reads `uri` (a local path, a `file://` URL, or a remote fsspec URL such
as `s3://bucket/key.mp4`, read through a block cache without downloading it whole) and adds
`video_id`, `size_bytes`, `container`, `codec`, `pix_fmt`, `duration_s`, `fps`, `width`, `height`,
`rotation`, `n_frames`, `has_audio`, `status` and `reason`.

A bad input is normal input: a missing, empty, garbage, truncated or audio-only file, or one whose first
video frame does not decode, becomes a row with `status` = "rejected" and a short machine-friendly
`reason` ("not_found", "not_a_file", "unsupported_uri: ...", "empty_file", "unreadable: <ffmpeg message>",
"no_video_stream", "truncated: ...", "zero_duration", "unknown_fps", "undecodable: ...", "too_small: WxH").
A row whose bytes cannot be read, or an empty file, gets a `video_id` from a hash of its uri instead, so
it is still ledgered once. Only a good file gets `status` = "done". The probe decodes just the first
video frame; it does not decode the whole file, so damage further in is found by later stages (split
counts the exact frames). `rotation` is the display matrix's counter-clockwise angle in [0, 360).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

import av
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import RowStage, StageConfig
from clipmill.storage import remote
from clipmill.storage.ids import video_id_from_file, video_id_from_path
from clipmill.storage.schema import STATUS_DONE, STATUS_REJECTED, VIDEO_FIELDS

log = logging.getLogger(__name__)

_ADDED = ("video_id", "size_bytes", "container", "codec", "pix_fmt", "duration_s", "fps", "width", "height",
          "rotation", "n_frames", "has_audio", "status", "reason")
_TYPES = {f.name: f.type for f in VIDEO_FIELDS}
_FFMPEG_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)

# Demuxers that answer to several names: pick the one matching the file's extension, else the first.
_EXT_ALIASES = {"mkv": "matroska", "m4v": "mp4", "qt": "mov"}


class ProbeConfig(StageConfig):
    """Settings of the probe stage.

    Args:
        min_side: reject videos whose shorter side (in coded pixels) is below this ("too_small: WxH").
        full_hash: hash every byte for `video_id` instead of sampled blocks (slower on big files).
        max_packets: how many video packets to feed the decoder while looking for the first frame
            before giving up with "undecodable: ..." (a few dozen covers long decoder delays).
    """

    min_side: int = Field(32, ge=1)
    full_hash: bool = False
    max_packets: int = Field(256, ge=1)


def local_path(uri: str) -> str:
    """The local filesystem path of a plain path or a `file://` URL; ValueError for other schemes."""
    if "://" not in uri and not uri.startswith("file:"):
        return uri
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"unsupported uri scheme {parsed.scheme!r} (probe reads local paths or file:// URLs)")
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL with a remote host is not supported: {uri!r}")
    return unquote(parsed.path, errors="surrogateescape")  # %XX of a non-UTF-8 file name: the same bytes


def _uri_id(uri: str) -> str:
    """Stand-in `video_id` for an input whose bytes cannot be read (hash of the uri, 16 hex digits)."""
    return hashlib.blake2b(f"uri:{uri}".encode(), digest_size=8).hexdigest()


def _short(exc: BaseException, limit: int = 160) -> str:
    """One-line error text without the path PyAV appends (`...: '/x/y.mp4'`)."""
    text = str(exc.strerror) if isinstance(exc, av.error.FFmpegError) and exc.strerror else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text[:limit]


def _container_name(fmt_name: str, path: str) -> str:
    names = fmt_name.split(",")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = _EXT_ALIASES.get(ext, ext)
    return ext if ext in names else names[0]


def _rate(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return float(rate)
    return None


class Probe(RowStage):
    """Container/stream metadata of each input, or a rejection with a reason; never raises for bad files.

    Decodes only the first video frame of each file (to prove it decodes and to read its rotation).
    `n_frames` is the stream's own frame count when the container stores one, else
    round(duration * fps); the split stage replaces it with the exact decoded count. Remote URLs are read
    through fsspec (same content id as the same bytes on a local disk). It does not check audio beyond its
    presence.
    """

    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StageConfig]] = ProbeConfig
    level: ClassVar[str] = "video"
    reads: ClassVar[tuple[str, ...]] = ("uri",)
    adds: ClassVar[dict[str, pa.DataType]] = {k: _TYPES[k] for k in _ADDED}
    batch_size: ClassVar[int] = 8

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        uri = row["uri"]
        out = dict(row, **probe_file(uri, self.cfg))
        if out["status"] == STATUS_REJECTED:
            log.info("probe rejected %s: %s", uri, out["reason"])
        return out


def probe_file(uri: str, cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Probe one video (local path, `file://` or remote URL); return the probe columns (status "done" or
    "rejected" with a reason)."""
    cfg = cfg or ProbeConfig()
    res: dict[str, Any] = {k: None for k in _ADDED}
    res["status"] = STATUS_REJECTED

    def reject(reason: str) -> dict[str, Any]:
        res["reason"] = reason
        return res

    if remote.is_remote(uri):
        return _probe_remote(uri, cfg, res, reject)
    try:
        path = local_path(uri)
    except ValueError as exc:
        res["video_id"] = _uri_id(uri)
        return reject(f"unsupported_uri: {exc}")
    try:
        size = os.path.getsize(path)
        if not os.path.isfile(path):
            res["video_id"] = _uri_id(uri)
            return reject("not_a_file")
        res["video_id"] = video_id_from_path(path, full=cfg.full_hash)
    except FileNotFoundError:
        res["video_id"] = _uri_id(uri)
        return reject("not_found")
    except OSError as exc:
        res["video_id"] = _uri_id(uri)
        return reject(f"unreadable: {type(exc).__name__}: {exc.strerror or exc}")
    except ValueError as exc:  # a path no OS call accepts (an embedded NUL byte)
        res["video_id"] = _uri_id(uri)
        return reject(f"unreadable: {type(exc).__name__}: {exc}")
    res["size_bytes"] = size
    if size == 0:  # no content to identify it: a content id would be shared by every empty file
        res["video_id"] = _uri_id(uri)
        return reject("empty_file")

    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except _FFMPEG_ERRORS as exc:
        return reject(f"unreadable: {_short(exc)}")
    try:
        return _probe_container(container, path, size, cfg, res, reject)
    except _FFMPEG_ERRORS as exc:  # anything FFmpeg raises later on a damaged file
        return reject(f"unreadable: {_short(exc)}")
    finally:
        container.close()


def _probe_remote(uri: str, cfg: ProbeConfig, res: dict[str, Any], reject) -> dict[str, Any]:
    """probe_file for a remote URL: the object is opened through fsspec and PyAV reads the file object."""
    try:
        f = remote.open_input(uri)
    except FileNotFoundError:
        res["video_id"] = _uri_id(uri)
        return reject("not_found")
    except IsADirectoryError:
        res["video_id"] = _uri_id(uri)
        return reject("not_a_file")
    except ValueError as exc:
        res["video_id"] = _uri_id(uri)
        return reject(f"unsupported_uri: {exc}")
    except Exception as exc:  # noqa: BLE001 - permissions, network, missing credentials (botocore errors)
        res["video_id"] = _uri_id(uri)
        return reject(f"unreadable: {type(exc).__name__}: {_short(exc)}")
    with f:
        try:
            size = remote.size_of(f)
            res["size_bytes"] = size
            if size == 0:
                res["video_id"] = _uri_id(uri)
                return reject("empty_file")
            res["video_id"] = video_id_from_file(f, size, full=cfg.full_hash)
            f.seek(0)
        except Exception as exc:  # noqa: BLE001 - a network or credentials error while reading
            res["video_id"] = _uri_id(uri)
            return reject(f"unreadable: {type(exc).__name__}: {_short(exc)}")
        try:
            container = av.open(f, mode="r", metadata_errors="ignore")
        except _FFMPEG_ERRORS as exc:
            return reject(f"unreadable: {_short(exc)}")
        try:
            return _probe_container(container, urlparse(uri).path, size, cfg, res, reject)
        except _FFMPEG_ERRORS as exc:
            return reject(f"unreadable: {_short(exc)}")
        finally:
            container.close()


def _probe_container(container, path: str, size: int, cfg: ProbeConfig, res: dict[str, Any], reject) -> dict:
    res["container"] = _container_name(container.format.name, path)
    res["has_audio"] = len(container.streams.audio) > 0
    if not container.streams.video:
        return reject("no_video_stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:  # PyAV opens no codec context for a codec FFmpeg cannot decode (e.g. a mangled codec tag)
        return reject("undecodable: no decoder for the video codec")
    res["codec"] = ctx.codec.canonical_name  # "av1", not the decoder's name "libdav1d"
    res["pix_fmt"] = ctx.pix_fmt
    res["width"], res["height"] = ctx.width or None, ctx.height or None

    # An index that points past the end of the file means the file was cut short.
    entries = stream.index_entries
    if entries is not None and len(entries):
        last = entries[len(entries) - 1]
        if last.pos >= 0 and last.pos + last.size > size:
            return reject(f"truncated: index needs {last.pos + last.size} bytes, file has {size}")

    fps = _rate(stream)
    res["fps"] = fps
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    n_frames = stream.frames or None
    if not duration and n_frames and fps:
        duration = n_frames / fps

    frame, err = _first_frame(container, stream, cfg.max_packets)
    if frame is None:
        return reject(f"undecodable: {err}")
    res["width"], res["height"] = frame.width, frame.height
    res["pix_fmt"] = res["pix_fmt"] or frame.format.name
    res["rotation"] = int(round(frame.rotation or 0)) % 360

    if fps is None:
        return reject("unknown_fps")
    if duration is None or not math.isfinite(duration) or duration <= 0:
        return reject("zero_duration")
    res["duration_s"] = duration
    res["n_frames"] = int(n_frames) if n_frames else max(1, int(round(duration * fps)))
    if min(frame.width, frame.height) < cfg.min_side:
        return reject(f"too_small: {frame.width}x{frame.height}")
    res["status"] = STATUS_DONE
    res["reason"] = None
    return res


def _first_frame(container, stream, max_packets: int) -> tuple[av.VideoFrame | None, str]:
    """Decode up to `max_packets` packets of `stream`; return (first frame, "") or (None, why not)."""
    err = "no frame decoded"
    n = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()  # the final (flush) packet drains the decoder
            except av.error.FFmpegError as exc:
                err = _short(exc)
                frames = []
            if frames:
                return frames[0], ""
            n += 1
            if n >= max_packets:
                err = f"no frame in the first {max_packets} packets"
                break
    except _FFMPEG_ERRORS as exc:
        err = _short(exc)
    return None, err
