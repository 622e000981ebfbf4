"""OCR stage on real decoded frames: burned-in subtitles are found and read, clean frames score ~0."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from clipmill import badfiles
from clipmill.stages.frames import Frames, FramesConfig, FrameSetConfig, decode_sets
from clipmill.stages.ocr import FRAME_SET, Ocr, OcrConfig, merge_lines, pick_frames
from clipmill.stages.transcode import Transcode

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
WORDS = ("SUNNY", "BEACH", "HOUSE")


def needs(name: str) -> Path:
    path = TESTDATA / name
    if not path.is_file():
        pytest.skip(f"shared test video {path} not found (the shared videos sit beside the repository in ../shared)")
    return path


def burn_subtitle(frame: np.ndarray, text: str = " ".join(WORDS)) -> np.ndarray:
    """A copy of an RGB frame with a large white, black-outlined subtitle near the bottom (as TV subtitles)."""
    out = frame.copy()
    h, w = out.shape[:2]
    scale, thick = 1.2 * w / 640, max(2, round(3 * w / 640))
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    org = ((w - tw) // 2, h - int(0.08 * h))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 4, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def texture(n: int = 3, h: int = 360, w: int = 640) -> np.ndarray:
    """n frames of a blurred colour-noise texture with a gradient (busy, but no text)."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        noise = rng.normal(120, 50, (h, w, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), 1.5)
        grad = np.linspace(-40, 40, w, dtype=np.float32)[None, :, None] * (1 if i % 2 else -1)
        frames.append(np.clip(noise + grad, 0, 255).astype(np.uint8))
    return np.stack(frames)


def row(frames: np.ndarray, uri: str = "mem://clip") -> dict:
    return {"uri": uri, "clip_index": 0, "frames_ocr": np.ascontiguousarray(frames).tobytes(),
            "frames_ocr_shape": list(frames.shape), "error": None}


def compact(text: str | None) -> str:
    return "".join((text or "").upper().split())


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    return Ocr()


@pytest.fixture(scope="module")
def bikes_frames() -> np.ndarray:
    """The "ocr" frame set of bikes.mp4 (3 frames, 640x272), decoded as the frames stage decodes it."""
    sets, _ = decode_sets(needs("bikes.mp4").read_bytes(), [FRAME_SET], 64)
    return sets[FRAME_SET.name]


# ---------------------------------------------------------------------------------------------- text found


def test_subtitle_on_texture_is_found_and_read(ocr):
    clean = texture()
    with_text = np.stack([burn_subtitle(f) for f in clean])
    got = ocr.process(row(with_text))
    assert got["text_area"] > 0.03, got["text_area"]
    assert all(w in compact(got["ocr_text"]) for w in WORDS), got["ocr_text"]
    assert got["ocr_text"].count("\n") == 0  # the same subtitle on 3 frames is one line
    none = ocr.process(row(clean))
    assert none["text_area"] < 0.005 and none["ocr_text"] is None, none


def test_subtitle_on_real_frames(ocr, bikes_frames):
    with_text = np.stack([burn_subtitle(f) for f in bikes_frames])
    got = ocr.process(row(with_text))
    assert got["text_area"] > 0.03, got["text_area"]
    assert all(w in compact(got["ocr_text"]) for w in WORDS), got["ocr_text"]
    clean = ocr.process(row(bikes_frames))
    assert clean["text_area"] < 0.005 and clean["ocr_text"] is None, clean


def test_subtitle_on_one_frame_counts_fully(ocr, bikes_frames):
    """text_area is the max over frames: a title on one sampled frame scores as if it stayed."""
    all_frames = ocr.process(row(np.stack([burn_subtitle(f) for f in bikes_frames])))["text_area"]
    one = ocr.process(row(np.stack([bikes_frames[0], burn_subtitle(bikes_frames[1]), bikes_frames[2]])))
    assert one["text_area"] == pytest.approx(all_frames, rel=0.3)
    assert all(w in compact(one["ocr_text"]) for w in WORDS)


def test_real_watermark_is_read():
    """testvideo.mp4 carries a real burned-in copyright line; frame 100 shows it."""
    path = needs("testvideo.mp4")
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == 100:
                frame = f.to_ndarray(format="rgb24", width=640, height=360, interpolation="AREA")
                break
    got = Ocr().process(row(frame[None]))
    assert "CASTELLANO" in compact(got["ocr_text"]), got["ocr_text"]
    assert 0.02 < got["text_area"] < 0.2, got["text_area"]


def test_detect_only(bikes_frames):
    ocr = Ocr(OcrConfig(detect_only=True, max_frames=1))
    got = ocr.process(row(np.stack([burn_subtitle(f) for f in bikes_frames])))
    assert got["text_area"] > 0.03 and got["ocr_text"] is None


# ---------------------------------------------------------------------------------------------- pipeline


def test_chain_transcode_frames_ocr(tmp_path, ocr):
    """A video with a burned-in subtitle, through transcode -> frames (with the ocr set) -> ocr."""
    path = needs("bikes.mp4")
    with av.open(str(path)) as c:
        src = [f.to_ndarray(format="rgb24") for _, f in zip(range(24), c.decode(video=0), strict=False)]
    video = badfiles.encode_video(tmp_path / "sub.mp4", np.stack([burn_subtitle(f) for f in src]), 25)
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        pts = [f.pts for f in c.decode(s)]
        tb, fps = str(s.time_base), float(s.average_rate)
    rows = pa.Table.from_pylist([{"uri": str(video), "clip_index": 0, "start_frame": 0, "end_frame": len(pts),
                                  "start_pts": pts[0], "end_pts": None, "time_base": tb, "fps": fps}])
    ocr_set = FrameSetConfig(name=FRAME_SET.name, n=FRAME_SET.n, max_side=FRAME_SET.max_side)
    batch = Frames(FramesConfig(n=2, extra_sets=(ocr_set,)))(Transcode()(rows))
    got = ocr(batch).to_pylist()[0]
    assert got["error"] is None, got["error"]
    assert got["text_area"] > 0.03
    assert all(w in compact(got["ocr_text"]) for w in WORDS), got["ocr_text"]


def test_batch_matches_rows_and_bad_rows_become_errors(ocr, bikes_frames):
    rows = [row(np.stack([burn_subtitle(f) for f in bikes_frames]), "a"), row(bikes_frames, "b")]
    batched = ocr(pa.Table.from_pylist(rows))  # two live rows: one process_many call
    assert batched.schema.field("text_area").type == pa.float32()
    for r, o in zip(rows, batched.to_pylist(), strict=True):
        single = ocr.process(r)
        assert o["error"] is None
        assert o["text_area"] == pytest.approx(single["text_area"], abs=1e-6)
        assert o["ocr_text"] == single["ocr_text"]
    bad = dict(row(bikes_frames, "bad"), frames_ocr_shape=[3, 272, 641, 3])
    out = ocr(pa.Table.from_pylist([rows[0], bad])).to_pylist()  # the batch fails, then row by row
    assert out[0]["error"] is None and out[0]["text_area"] > 0.03
    assert out[1]["error"].startswith("ocr: ValueError") and out[1]["text_area"] is None
    missing = ocr(pa.Table.from_pylist([{"uri": "x", "clip_index": 0, "error": None}])).to_pylist()[0]
    assert "frames stage" in missing["error"]


def test_model_is_built_once_per_instance(monkeypatch, bikes_frames):
    import onnxruntime
    import rapidocr_onnxruntime
    import rapidocr_onnxruntime.utils.infer_engine as engine_mod

    built = []

    class Counting(rapidocr_onnxruntime.RapidOCR):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(rapidocr_onnxruntime, "RapidOCR", Counting)
    ocr = Ocr(OcrConfig(max_frames=1))
    assert len(built) == 1

    def no_session(*a, **k):
        raise AssertionError("an ONNX session was created while processing rows")

    monkeypatch.setattr(engine_mod, "InferenceSession", no_session)
    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    rows = [row(bikes_frames, f"r{i}") for i in range(3)]
    ocr(pa.Table.from_pylist(rows))
    for r in rows:
        ocr.process(r)
    assert len(built) == 1


# ---------------------------------------------------------------------------------------------- helpers


def test_merge_lines_dedups_and_caps():
    lines = ["Copyright @ 2013 Brandon  Castellano", "www.bcastell.com", "Copyright 0 2013 Brandon Castellano",
             "WWW.BCASTELL.COM", "Frame = 1", "Frame = 15", "", "  "]
    assert merge_lines(lines, 1000) == "Copyright @ 2013 Brandon Castellano\nwww.bcastell.com\nFrame = 1\nFrame = 15"
    assert merge_lines(lines, 9) == "Copyright"
    assert merge_lines(["", " "], 100) is None


def test_pick_frames_and_config():
    assert pick_frames(3, 3) == [0, 1, 2]
    assert pick_frames(3, 2) == [0, 2]
    assert pick_frames(3, 1) == [1]
    assert pick_frames(3, 8) == [0, 1, 2]
    with pytest.raises(ValidationError):
        OcrConfig(min_box_score=1.5)
    with pytest.raises(ValidationError):
        OcrConfig(frames=3)  # unknown key
    assert Ocr.frame_sets == (FRAME_SET,) and Ocr.reads == ("frames_ocr", "frames_ocr_shape")
    assert Ocr.adds == {"text_area": pa.float32(), "ocr_text": pa.string()}
