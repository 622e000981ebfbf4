"""Transcode stage: every clip decodes to exactly its frames, first and last matching the source."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest

from clipmill import badfiles
from clipmill.stages.transcode import Transcode, TranscodeConfig, cut_clip, faststart, target_size

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
SMALL = (64, 36)  # frames are compared as 64x36 gray images


class Source:
    """Every decoded frame of a video as a small gray image, with its PTS, time base and fps."""

    def __init__(self, path: Path, rotate: int = 0) -> None:
        self.path = str(path)
        with av.open(self.path) as c:
            s = c.streams.video[0]
            self.time_base = str(s.time_base)
            self.fps = float(s.average_rate)
            self.pts, imgs = [], []
            for f in c.decode(s):
                self.pts.append(f.pts)
                rgb = f.to_ndarray(format="rgb24")
                imgs.append(_small(np.rot90(rgb, rotate // 90)))
        self.images = np.stack(imgs)

    def row(self, start: int, end: int, clip_index: int = 0) -> dict:
        return {"uri": self.path, "clip_index": clip_index, "start_frame": start, "end_frame": end,
                "start_pts": self.pts[start], "end_pts": self.pts[end] if end < len(self.pts) else None,
                "time_base": self.time_base, "fps": self.fps}


def _small(rgb: np.ndarray) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, SMALL, interpolation=cv2.INTER_AREA).astype(np.float32)


def decode_media(data: bytes) -> tuple[np.ndarray, int, int, float]:
    """(small gray frames, width, height, fps) of MP4 bytes."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        imgs = [_small(f.to_ndarray(format="rgb24")) for f in c.decode(s)]
        return np.stack(imgs), s.width, s.height, float(s.average_rate)


def assert_matches(img: np.ndarray, src: Source, index: int) -> None:
    """`img` is source frame `index`: close to it, and closer to it than to its neighbours."""
    d = {j: float(np.abs(img - src.images[j]).mean()) for j in (index - 1, index, index + 1)
         if 0 <= j < len(src.images)}
    best = min(d, key=d.get)
    assert best == index and d[index] < 3.0, f"expected source frame {index}, diffs {d}"


def check_clip(row: dict, src: Source) -> np.ndarray:
    """Decode a transcoded row; check frame count, first and last frame, metadata. Returns the frames."""
    assert row.get("error") is None, row.get("error")
    start, end = row["start_frame"], row["end_frame"]
    imgs, w, h, fps = decode_media(row["media"])
    assert len(imgs) == row["clip_n_frames"] == end - start
    assert (w, h) == (row["clip_width"], row["clip_height"])
    assert w % 2 == 0 and h % 2 == 0
    assert fps == pytest.approx(src.fps, rel=1e-3)
    assert row["clip_duration_s"] == pytest.approx((end - start) / src.fps, rel=1e-3)
    assert row["media_codec"] == "h264"
    assert_matches(imgs[0], src, start)
    assert_matches(imgs[-1], src, end - 1)
    return imgs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("transcode_inputs")
    return {
        "valid": badfiles.make_valid(d, n=60, gop=12),  # B-frames, keyframe every 12
        "pts_offset": badfiles.make_pts_offset(d),
        "vfr": badfiles.make_vfr(d),
        "vp9": badfiles.make_vp9_webm(d),
        "hevc": badfiles.make_hevc_mkv(d),
        "av1": badfiles.make_av1_mkv(d),
        "mpeg4": badfiles.make_mpeg4_avi(d),
        "odd": badfiles.make_odd_size(d),
        "short": badfiles.make_very_short(d),
        "rotated": badfiles.make_rotated(d),
    }


SPANS = {
    "valid": [(0, 12), (12, 24), (13, 30), (25, 37), (47, 60)],
    "pts_offset": [(0, 5), (5, 17), (17, 30)],
    "vfr": [(0, 7), (7, 30), (30, 40)],
    "vp9": [(0, 9), (9, 24)],
    "hevc": [(3, 16), (16, 24)],
    "av1": [(2, 12), (12, 24)],
    "mpeg4": [(0, 11), (11, 24)],
    "odd": [(4, 20)],
    "short": [(0, 2), (1, 2)],
}


@pytest.mark.parametrize("name", sorted(SPANS))
def test_clips_are_frame_exact(inputs, name):
    src = Source(inputs[name])
    batch = pa.Table.from_pylist([src.row(a, b, i) for i, (a, b) in enumerate(SPANS[name])])
    out = Transcode()(batch)
    for row in out.to_pylist():
        check_clip(row, src)


def test_odd_size_becomes_even(inputs):
    src = Source(inputs["odd"])
    row = Transcode()(pa.Table.from_pylist([src.row(0, 24)])).to_pylist()[0]
    assert (row["clip_width"], row["clip_height"]) == (176, 98)


def test_rotated_source_is_turned_upright(inputs):
    src = Source(inputs["rotated"], rotate=90)  # display matrix: 90 degrees counter-clockwise
    row = Transcode()(pa.Table.from_pylist([src.row(6, 18)])).to_pylist()[0]
    assert (row["clip_width"], row["clip_height"]) == (96, 160)
    check_clip(row, src)


def test_bad_start_pts_falls_back_to_counting(inputs):
    src = Source(inputs["valid"])
    rows = [dict(src.row(13, 30), start_pts=src.pts[13] + 1),  # no frame has this PTS
            dict(src.row(25, 37), start_pts=None, end_pts=None, time_base=None)]  # no PTS at all
    for row in Transcode()(pa.Table.from_pylist(rows)).to_pylist():
        check_clip(row, src)
    media = cut_clip(src.path, 13, 30, src.pts[13] + 1, src.pts[30], src.time_base, src.fps, 512, 20, "veryfast")
    assert not media.used_seek
    media = cut_clip(src.path, 13, 30, src.pts[13], src.pts[30], src.time_base, src.fps, 512, 20, "veryfast")
    assert media.used_seek


def test_span_past_the_end_is_an_error_row_not_a_crash(inputs):
    src = Source(inputs["valid"])
    # an `error` column must be present: stages/base.py keeps only the input columns plus `adds`
    rows = [dict(src.row(50, 59), end_frame=80, end_pts=None, error=None), dict(src.row(0, 12, 1), error=None)]
    table = pa.Table.from_pylist(rows)
    table = table.set_column(table.schema.get_field_index("error"), "error", table["error"].cast(pa.string()))
    out = Transcode()(table).to_pylist()
    assert out[0]["error"].startswith("transcode: RuntimeError: wrote 10 frames")
    assert out[0]["media"] is None
    check_clip(out[1], src)


def test_skips_error_and_rejected_rows(inputs):
    src = Source(inputs["valid"])
    rows = [dict(src.row(0, 12), error="split: boom"), dict(src.row(0, 12), clip_index=-1)]
    out = Transcode()(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["media"] for r in out] == [None, None]
    assert out[0]["error"] == "split: boom"


def test_media_is_streamable_and_hash_matches(inputs):
    import hashlib

    src = Source(inputs["valid"])
    media = cut_clip(src.path, 12, 24, src.pts[12], src.pts[24], src.time_base, src.fps, 512, 20, "veryfast")
    assert media.data.index(b"moov") < media.data.index(b"mdat")  # index first: streamable
    assert faststart(media.data) == media.data
    assert media.sha256 == hashlib.sha256(media.data).hexdigest()


def test_target_size():
    assert target_size(1280, 720, 512) == (512, 288)
    assert target_size(640, 272, 512) == (512, 218)
    assert target_size(720, 1280, 512) == (288, 512)
    assert target_size(177, 99, 512) == (176, 98)
    assert target_size(177, 99, 0) == (176, 98)


def test_config_is_validated():
    with pytest.raises(ValueError):
        TranscodeConfig(preset="warp")
    with pytest.raises(ValueError):
        TranscodeConfig(crf=60)


def _testdata(name: str) -> Path:
    path = TESTDATA / name
    if not path.is_file():
        pytest.skip(f"shared test video {path} not found (it sits beside the repository in ../shared/testdata)")
    return path


def test_delayed_start_pts_offset():
    src = Source(_testdata("delayed_start.mp4"))  # first frame at PTS 1.075 s, MPEG-4 Part 2
    assert src.pts[0] > 0
    spans = [(0, 8), (8, 17), (17, 24)]
    out = Transcode()(pa.Table.from_pylist([src.row(a, b, i) for i, (a, b) in enumerate(spans)]))
    for row in out.to_pylist():
        check_clip(row, src)


@pytest.mark.slow
def test_bikes_shots_cut_exactly_at_hard_cuts():
    src = Source(_testdata("bikes.mp4"))
    bounds = [0, 30, 76, 137, 187, 242, 250]  # truth.json cuts
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    out = Transcode()(pa.Table.from_pylist([src.row(a, b, i) for i, (a, b) in enumerate(spans)]))
    for row in out.to_pylist():
        imgs = check_clip(row, src)
        assert (row["clip_width"], row["clip_height"]) == (512, 218)
        # at a hard cut the neighbour outside the clip is a different shot: far from the clip's end frames
        a, b = row["start_frame"], row["end_frame"]
        if a > 0:
            assert np.abs(imgs[0] - src.images[a - 1]).mean() > 10
        if b < len(src.images):
            assert np.abs(imgs[-1] - src.images[b]).mean() > 10
