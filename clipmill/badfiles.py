"""Makers of broken and exotic input files, for tests and benchmarks of the media stages.

Every maker is `make_<kind>(dir, ...) -> Path`: it writes one file into `dir` (created if needed) and
returns its path. Two families:

* Broken inputs, which the probe stage must reject with a reason and never crash on: a truncated MP4
  (index at the end, so it is lost; or index first, so it points past the end), one with a corrupted
  header, one whose video packets are garbage, random bytes, an empty file and a text file (all named `.mp4`), and an
  audio-only file.
* Exotic but valid videos, which must pass: VP9 in WebM, HEVC in Matroska, AV1 (SVT-AV1) in Matroska,
  MPEG-4 Part 2 in AVI, an odd frame size, a very short (2-frame) clip, a variable frame rate, a stream
  whose first frame has a large PTS offset, and a stream rotated by a display matrix. `make_tiny` (16x16)
  is valid video that the probe rejects as too small under its default `min_side`.

Content comes from `moving_frames`: a colour gradient with a bright square that moves one step per
frame, so every frame differs from its neighbours and frame-exact cutting can be checked by image
comparison. Written with PyAV + NumPy only (no ffmpeg binary). Nothing here reads or checks videos.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from clipmill.synth import keep_thread_scheduling

log = logging.getLogger(__name__)

__all__ = [
    "BROKEN_MAKERS",
    "EXOTIC_MAKERS",
    "encode_video",
    "make_audio_only",
    "make_av1_mkv",
    "make_empty",
    "make_garbage_payload",
    "make_header_corrupted",
    "make_hevc_mkv",
    "make_mpeg4_avi",
    "make_odd_size",
    "make_pts_offset",
    "make_random_bytes",
    "make_rotated",
    "make_text",
    "make_tiny",
    "make_truncated",
    "make_truncated_faststart",
    "make_valid",
    "make_vfr",
    "make_very_short",
    "make_vp9_webm",
    "moving_frames",
]

_FAST_OPTIONS = {
    "libx264": {"preset": "ultrafast", "crf": "18"},
    "libx265": {"preset": "ultrafast", "crf": "24", "x265-params": "log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b:v": "0"},
    "libsvtav1": {"preset": "12", "crf": "40"},
    "mpeg4": {"qscale": "3"},
}


def moving_frames(n: int, width: int = 160, height: int = 96, seed: int = 0) -> np.ndarray:
    """`n` RGB frames (n, height, width, 3) uint8: a drifting gradient plus a square moving per frame.

    Neighbouring frames differ visibly (the square moves by about 1/8 of its size per frame and the
    gradient shifts), so a frame can be matched to its index by comparing downscaled images.
    """
    if n < 1 or width < 2 or height < 2:
        raise ValueError(f"need n >= 1 and size >= 2x2, got n={n}, {width}x{height}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base_col = rng.uniform(40, 200, 3).astype(np.float32)
    side = max(2, min(width, height) // 3)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        img = np.empty((height, width, 3), np.float32)
        img[..., 0] = base_col[0] + 50 * np.sin((xx + 3 * i) / max(width, 1) * 2 * np.pi)
        img[..., 1] = base_col[1] + 50 * np.cos((yy - 2 * i) / max(height, 1) * 2 * np.pi)
        img[..., 2] = base_col[2] + 40 * np.sin((xx + yy + 5 * i) / max(width + height, 1) * 4 * np.pi)
        step = max(1, side // 8)
        span_x, span_y = max(1, width - side), max(1, height - side)
        x = (i * step) % span_x
        y = (i * step // span_x * step + i * step // 2) % span_y
        img[y : y + side, x : x + side] = (250.0, 250.0, 30.0 + (i * 37) % 200)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def encode_video(
    path: str | os.PathLike,
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float | Fraction = 24,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    container_format: str | None = None,
    options: dict[str, str] | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    audio_codec: str | None = None,
) -> Path:
    """Encode RGB frames to `path` with full control over timestamps, rotation and an audio track.

    Args:
        path: output file; the container comes from `container_format` or the suffix.
        frames: (n, h, w, 3) uint8 RGB frames, all one size.
        fps: nominal frame rate (the stream's rate; with `pts` the real timing may differ).
        codec, pix_fmt, options: video encoder, pixel format and encoder options (fast defaults per codec).
        pts: per-frame timestamps in `time_base` units (default 0..n-1 at 1/fps).
        time_base: time base of `pts` (default 1/fps).
        rotation: counter-clockwise display rotation in degrees written as a display matrix.
        audio_codec: also write one second of a 440 Hz tone with this encoder (e.g. "aac").

    Does not pad odd sizes: pass a `pix_fmt` the codec accepts for the frame size.
    """
    path = Path(path)
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    tb = time_base if time_base is not None else 1 / rate
    frames = [np.ascontiguousarray(f) for f in frames]
    if not frames:
        raise ValueError("no frames to encode")
    if pts is not None and len(pts) != len(frames):
        raise ValueError(f"{len(pts)} pts for {len(frames)} frames")
    height, width = frames[0].shape[:2]
    opts = dict(_FAST_OPTIONS.get(codec, {}) if options is None else options)
    with keep_thread_scheduling(), av.open(str(path), mode="w", format=container_format) as out:
        vs = out.add_stream(codec, rate=rate)
        vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
        vs.codec_context.time_base = tb
        vs.options = opts
        if rotation:
            vs.set_display_rotation(rotation)
        aus = _add_audio(out, audio_codec) if audio_codec else None
        for i, arr in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(arr, format="rgb24")
            vf.pts = int(pts[i]) if pts is not None else i
            vf.time_base = tb
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        if aus is not None:
            _write_tone(out, aus, seconds=1.0)
    log.debug("wrote %s (%d frames, %s)", path, len(frames), codec)
    return path


def _add_audio(out: av.container.OutputContainer, codec: str) -> av.audio.stream.AudioStream:
    """Add a 48 kHz stereo audio stream to an output container."""
    stream = out.add_stream(codec, rate=48000)
    stream.layout = "stereo"
    return stream


def _write_tone(out: av.container.OutputContainer, stream: av.audio.stream.AudioStream, seconds: float) -> None:
    """Encode a 440 Hz tone to `stream` in frames of the encoder's frame size."""
    ctx = stream.codec_context
    rate = ctx.sample_rate
    fmt = ctx.format.name
    chunk = ctx.frame_size or 1024
    total = int(seconds * rate)
    t = np.arange(total) / rate
    wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for start in range(0, total, chunk):
        piece = wave[start : start + chunk]
        if len(piece) < chunk:
            piece = np.pad(piece, (0, chunk - len(piece)))
        if fmt.endswith("p"):  # planar: (channels, samples)
            data = np.stack([piece, piece])
        else:  # packed: (1, samples * channels)
            data = np.stack([piece, piece], axis=1).reshape(1, -1)
        if fmt.startswith("s16"):
            data = (data * 32767).astype(np.int16)
        af = av.AudioFrame.from_ndarray(data, format=fmt, layout="stereo")
        af.sample_rate = rate
        af.pts = start
        af.time_base = Fraction(1, rate)
        for packet in stream.encode(af):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def _dir(d: str | os.PathLike) -> Path:
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------------
# Valid reference and broken inputs
# --------------------------------------------------------------------------------------------------


def make_valid(d: str | os.PathLike, name: str = "valid.mp4", n: int = 48, width: int = 160, height: int = 96,
               fps: float = 24, gop: int = 12, audio: bool = False) -> Path:
    """A plain H.264 MP4 of `moving_frames` with a keyframe every `gop` frames (and AAC audio if asked).

    B-frames are on (preset veryfast), so decode order differs from packet order, as in real files.
    """
    opts = {"preset": "veryfast", "crf": "18", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
    return encode_video(_dir(d) / name, moving_frames(n, width, height), fps, options=opts,
                        audio_codec="aac" if audio else None)


def make_truncated(d: str | os.PathLike, src: str | os.PathLike | None = None, keep: float = 0.5,
                   name: str = "truncated.mp4") -> Path:
    """The first `keep` fraction of the bytes of `src` (default: a fresh `make_valid` file).

    PyAV writes the MP4 index (`moov`) at the end, so the cut file has media data but no index.
    """
    if not 0 <= keep < 1:
        raise ValueError(f"keep must be in [0, 1), got {keep}")
    src = Path(src) if src is not None else make_valid(d, name="_truncated_src.mp4")
    data = src.read_bytes()
    out = _dir(d) / name
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def make_header_corrupted(d: str | os.PathLike, src: str | os.PathLike | None = None,
                          name: str = "header_corrupted.mp4", seed: int = 0) -> Path:
    """`src` (default: a fresh `make_valid` file) with its first 4 KiB and its `moov` box overwritten by noise.

    Both the file-type header and the stream index are destroyed; the media payload is intact.
    """
    src = Path(src) if src is not None else make_valid(d, name="_corrupt_src.mp4")
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    head = min(4096, len(data))
    data[:head] = rng.integers(0, 256, head, dtype=np.uint8).tobytes()
    moov = bytes(data).find(b"moov")
    if moov >= 4:
        end = min(len(data), moov - 4 + 4096)
        data[moov - 4 : end] = rng.integers(0, 256, end - moov + 4, dtype=np.uint8).tobytes()
    out = _dir(d) / name
    out.write_bytes(bytes(data))
    return out


def make_truncated_faststart(d: str | os.PathLike, keep: float = 0.6, name: str = "truncated_faststart.mp4") -> Path:
    """A streamable MP4 (index first, as web downloads are) cut after `keep` of its bytes.

    The index is intact and the first frames decode; only the index points past the end of the file.
    """
    from clipmill.stages.transcode import faststart  # lazy: only this maker needs the MP4 box rewriter

    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    data = faststart(make_valid(d, name="_truncated_fs_src.mp4", n=96).read_bytes())
    out = _dir(d) / name
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def make_garbage_payload(d: str | os.PathLike, name: str = "garbage_payload.mp4", seed: int = 0) -> Path:
    """An MP4 whose container and index are intact but whose video packets are random bytes."""
    data = bytearray(make_valid(d, name="_garbage_src.mp4").read_bytes())
    pos = bytes(data).find(b"mdat")
    end = bytes(data).find(b"moov")
    if pos < 0 or end < pos:
        raise RuntimeError("expected an MP4 with mdat before moov")
    rng = np.random.default_rng(seed)
    data[pos + 4 : end - 4] = rng.integers(0, 256, end - 4 - pos - 4, dtype=np.uint8).tobytes()
    out = _dir(d) / name
    out.write_bytes(bytes(data))
    return out


def make_random_bytes(d: str | os.PathLike, size: int = 65536, name: str = "random.mp4", seed: int = 0) -> Path:
    """`size` random bytes named like a video."""
    out = _dir(d) / name
    out.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return out


def make_empty(d: str | os.PathLike, name: str = "empty.mp4") -> Path:
    """A zero-byte file named like a video."""
    out = _dir(d) / name
    out.write_bytes(b"")
    return out


def make_text(d: str | os.PathLike, name: str = "notes.mp4") -> Path:
    """A small text file named like a video."""
    out = _dir(d) / name
    out.write_text("This is not a video.\n" * 40, encoding="utf-8")
    return out


def make_audio_only(d: str | os.PathLike, codec: str = "aac", name: str | None = None) -> Path:
    """One second of a tone and no video stream: AAC in .mp4 (default) or "libopus" in .ogg."""
    suffix = ".mp4" if codec == "aac" else ".ogg"
    out = _dir(d) / (name or f"audio_only_{codec}{suffix}")
    with av.open(str(out), mode="w") as container:
        stream = _add_audio(container, codec)
        _write_tone(container, stream, seconds=1.0)
    return out


# --------------------------------------------------------------------------------------------------
# Exotic but valid videos
# --------------------------------------------------------------------------------------------------


def make_vp9_webm(d: str | os.PathLike, n: int = 24, name: str = "vp9.webm") -> Path:
    """VP9 in WebM, 160x96, 24 fps."""
    return encode_video(_dir(d) / name, moving_frames(n), 24, codec="libvpx-vp9")


def make_hevc_mkv(d: str | os.PathLike, n: int = 24, name: str = "hevc.mkv") -> Path:
    """HEVC (libx265) in Matroska, 160x96, 25 fps."""
    return encode_video(_dir(d) / name, moving_frames(n), 25, codec="libx265")


def make_av1_mkv(d: str | os.PathLike, n: int = 24, name: str = "av1.mkv") -> Path:
    """AV1 (SVT-AV1) in Matroska, 160x96 (SVT-AV1 needs at least 64x64), 24 fps."""
    return encode_video(_dir(d) / name, moving_frames(n), 24, codec="libsvtav1")


def make_mpeg4_avi(d: str | os.PathLike, n: int = 24, name: str = "mpeg4.avi") -> Path:
    """MPEG-4 Part 2 in AVI, 160x96, 25 fps."""
    return encode_video(_dir(d) / name, moving_frames(n), 25, codec="mpeg4")


def make_odd_size(d: str | os.PathLike, width: int = 177, height: int = 99, n: int = 24,
                  name: str = "odd_size.mp4") -> Path:
    """H.264 at an odd frame size (default 177x99, stored as 4:4:4 because 4:2:0 needs even sizes)."""
    pix = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    return encode_video(_dir(d) / name, moving_frames(n, width, height), 24, pix_fmt=pix)


def make_tiny(d: str | os.PathLike, n: int = 12, name: str = "tiny.mp4") -> Path:
    """A valid 16x16 H.264 video (rejected by the probe's default `min_side`)."""
    return encode_video(_dir(d) / name, moving_frames(n, 16, 16), 24)


def make_very_short(d: str | os.PathLike, n: int = 2, name: str = "very_short.mp4") -> Path:
    """A valid H.264 video of only `n` (default 2) frames."""
    return encode_video(_dir(d) / name, moving_frames(n), 24)


def make_vfr(d: str | os.PathLike, n: int = 40, name: str = "vfr.mkv") -> Path:
    """Variable frame rate: H.264 in Matroska (1 ms time base) with frame gaps cycling 20/40/60 ms."""
    gaps = [20, 40, 60]
    pts = np.concatenate([[0], np.cumsum([gaps[i % 3] for i in range(n - 1)])]).astype(int)
    return encode_video(_dir(d) / name, moving_frames(n), 25, pts=pts.tolist(), time_base=Fraction(1, 1000))


def make_pts_offset(d: str | os.PathLike, n: int = 30, offset_s: float = 1.5, name: str = "pts_offset.mp4") -> Path:
    """H.264 MP4 whose first video frame is at `offset_s` seconds, not 0 (like delayed_start.mp4)."""
    rate = Fraction(25)
    start = int(round(offset_s * 25))
    return encode_video(_dir(d) / name, moving_frames(n), rate, pts=list(range(start, start + n)),
                        options={"preset": "veryfast", "crf": "18", "g": "10", "sc_threshold": "0"})


def make_rotated(d: str | os.PathLike, rotation: int = 90, n: int = 24, name: str = "rotated.mp4") -> Path:
    """H.264 MP4 (160x96 coded) with a display matrix that rotates it by `rotation` degrees counter-clockwise."""
    return encode_video(_dir(d) / name, moving_frames(n), 24, rotation=rotation)


BROKEN_MAKERS = {
    "truncated": make_truncated,
    "truncated_faststart": make_truncated_faststart,
    "garbage_payload": make_garbage_payload,
    "header_corrupted": make_header_corrupted,
    "random_bytes": make_random_bytes,
    "empty": make_empty,
    "text": make_text,
    "audio_only": make_audio_only,
    "tiny": make_tiny,
}
"""Makers whose output the probe stage (default config) must reject."""

EXOTIC_MAKERS = {
    "vp9_webm": make_vp9_webm,
    "hevc_mkv": make_hevc_mkv,
    "av1_mkv": make_av1_mkv,
    "mpeg4_avi": make_mpeg4_avi,
    "odd_size": make_odd_size,
    "very_short": make_very_short,
    "vfr": make_vfr,
    "pts_offset": make_pts_offset,
    "rotated": make_rotated,
}
"""Makers of unusual but valid videos that the probe stage must accept."""


# --------------------------------------------------------------------------------------------------
# Extreme inputs for fuzz tests: one-pixel video, headers that claim a huge frame, a mid-stream size change
# --------------------------------------------------------------------------------------------------

__all__ += [
    "make_claimed_size_mjpeg",
    "make_claimed_size_mp4",
    "make_claimed_size_y4m",
    "make_latin1_metadata",
    "make_one_pixel",
    "make_size_change",
    "make_unknown_codec_tag",
    "patch_mp4_dimensions",
]


def make_one_pixel(d: str | os.PathLike, n: int = 12, name: str = "one_pixel.mkv", seed: int = 0) -> Path:
    """A valid 1x1 video of `n` random-colour frames: FFV1 (lossless, 4:4:4) in Matroska.

    `moving_frames` needs at least 2x2, so the content is plain noise; H.264 also encodes 1x1 as yuv444p.
    """
    frames = np.random.default_rng(seed).integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    return encode_video(_dir(d) / name, frames, 24, codec="ffv1", pix_fmt="yuv444p", options={})


def patch_mp4_dimensions(data: bytes, width: int, height: int) -> bytes:
    """MP4 bytes whose container claims `width` x `height` (every `tkhd` and visual sample entry patched).

    Only the container's fields change; the coded stream (e.g. the H.264 SPS) keeps its real size, so a
    decoder still produces frames of the original size. Raises ValueError when no field was found.
    """
    import struct  # noqa: PLC0415 - only these makers pack binary fields

    out = bytearray(data)
    patched = 0
    pos = out.find(b"tkhd")
    while pos >= 4:
        version = out[pos + 4]
        at = pos + 4 + (88 if version == 1 else 76)  # width, height: 16.16 fixed point at the end of tkhd
        if at + 8 <= len(out):
            out[at : at + 8] = struct.pack(">II", width << 16, height << 16)
            patched += 1
        pos = out.find(b"tkhd", pos + 4)
    for entry in (b"avc1", b"avc3", b"hvc1", b"hev1", b"mp4v", b"av01", b"vp09"):
        pos = out.find(entry)
        while pos >= 4:
            at = pos + 28  # VisualSampleEntry: 8 bytes after the box header, then 16 of pre_defined/reserved
            if at + 4 <= len(out):
                out[at : at + 4] = struct.pack(">HH", width, height)
                patched += 1
            pos = out.find(entry, pos + 4)
    if not patched:
        raise ValueError("no tkhd box or visual sample entry found to patch")
    return bytes(out)


def make_claimed_size_mp4(d: str | os.PathLike, width: int = 7680, height: int = 4320,
                          name: str = "claims_8k.mp4") -> Path:
    """A tiny (160x96) H.264 MP4 whose container header claims `width` x `height` (default 8K UHD)."""
    src = make_valid(d, name="_claims_src.mp4", n=24)
    out = _dir(d) / name
    out.write_bytes(patch_mp4_dimensions(src.read_bytes(), width, height))
    src.unlink()
    return out


def make_claimed_size_mjpeg(d: str | os.PathLike, width: int = 7680, height: int = 4320, n: int = 6,
                            name: str = "claims_8k_mjpeg.avi") -> Path:
    """Motion-JPEG in AVI, coded at 64x48, whose every JPEG frame header (SOF0) claims `width` x `height`.

    Unlike `make_claimed_size_mp4`, here the decoder itself believes the claim and allocates frames of
    that size from a few hundred bytes of scan data (so each decoded frame is mostly empty or an error).
    """
    import struct  # noqa: PLC0415 - only these makers pack binary fields

    src = encode_video(_dir(d) / "_claims_src.avi", moving_frames(n, 64, 48), 24, codec="mjpeg",
                       pix_fmt="yuvj420p", options={})
    data = bytearray(src.read_bytes())
    src.unlink()
    patched = 0
    pos = data.find(b"\xff\xc0")
    while pos >= 0:
        # SOF0: FF C0, length (2) = 17 for 3 components, precision (1) = 8, height (2), width (2)
        if data[pos + 2 : pos + 5] == b"\x00\x11\x08":
            data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            patched += 1
        pos = data.find(b"\xff\xc0", pos + 2)
    if patched != n:
        raise RuntimeError(f"patched {patched} JPEG frame headers, expected {n}")
    out = _dir(d) / name
    out.write_bytes(bytes(data))
    return out


def make_claimed_size_y4m(d: str | os.PathLike, width: int = 7680, height: int = 4320,
                          name: str = "claims_8k.y4m") -> Path:
    """A YUV4MPEG2 file whose header claims `width` x `height` but which holds 1 KiB of one frame."""
    out = _dir(d) / name
    out.write_bytes(f"YUV4MPEG2 W{width} H{height} F24:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1024))
    return out


def make_size_change(d: str | os.PathLike, n: int = 12, name: str = "size_change.mkv") -> Path:
    """H.264 whose frame size changes midway: `n` frames 160x96, then `n` frames 64x48, at 24 fps.

    Two Annex-B streams back to back (the second starts with its own SPS/PPS and an IDR frame, as in a
    broadcast capture that switches resolution), remuxed into Matroska with timestamps; with a `.h264`
    name the raw stream is kept as it is (no container, so no duration).
    """
    first = encode_video(_dir(d) / "_size_a.h264", moving_frames(n, 160, 96), 24, container_format="h264")
    second = encode_video(_dir(d) / "_size_b.h264", moving_frames(n, 64, 48, seed=1), 24, container_format="h264")
    raw = _dir(d) / "_size_ab.h264"
    raw.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()
    out = _dir(d) / name
    if out.suffix == ".h264":
        raw.replace(out)
        return out
    tb = Fraction(1, 24)
    with av.open(str(raw), format="h264") as src, av.open(str(out), mode="w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        i = 0
        for packet in src.demux(src.streams.video[0]):
            if packet.size == 0:  # the demuxer's final empty packet
                continue
            packet.stream = stream
            packet.pts = packet.dts = i
            packet.duration = 1
            packet.time_base = tb
            dst.mux(packet)
            i += 1
    raw.unlink()
    return out


def make_latin1_metadata(d: str | os.PathLike, name: str = "latin1_title.webm") -> Path:
    """VP9 in WebM whose container title is Latin-1 bytes, not UTF-8 (as old Windows tools wrote them)."""
    src = make_vp9_webm(d, name="_meta_src.webm")
    tagged = _dir(d) / "_meta_tagged.webm"
    with av.open(str(src)) as i, av.open(str(tagged), mode="w") as o:
        o.metadata["title"] = "TITLEMARK"
        stream = o.add_stream_from_template(i.streams.video[0])
        for packet in i.demux(i.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            o.mux(packet)
    data = tagged.read_bytes()
    if data.count(b"TITLEMARK") != 1:
        raise RuntimeError("could not find the title to patch")
    out = _dir(d) / name
    out.write_bytes(data.replace(b"TITLEMARK", b"caf\xe9 \xab!\xbb\xff"))  # same length: sizes stay valid
    src.unlink()
    tagged.unlink()
    return out


def make_unknown_codec_tag(d: str | os.PathLike, name: str = "unknown_codec.mp4") -> Path:
    """A valid H.264 MP4 whose sample entry names a codec nobody knows (`avc1` -> `zzzz`).

    The container opens and lists a video stream, but FFmpeg has no decoder for it (PyAV gives the stream no
    codec context); the bytes of the stream itself are intact.
    """
    src = make_valid(d, name="_tag_src.mp4", n=24)
    data = src.read_bytes()
    src.unlink()
    at = data.find(b"avc1", data.find(b"stsd"))
    if at < 0:
        raise RuntimeError("no avc1 sample entry found")
    out = _dir(d) / name
    out.write_bytes(data[:at] + b"zzzz" + data[at + 4 :])
    return out
