"""OCR stage: how much of a clip is covered by on-screen text, and what the text says.

One row per clip (level "clip"). Reads the "ocr" frame set (`frames_ocr`, `frames_ocr_shape`: 3 frames spread
over the clip, first and last included, longer side 640 px; see FRAME_SET) and adds:

* `text_area` (float32, 0-1): per sampled frame, the fraction of the frame's area covered by the union of the
  detected text-line boxes that count (below); the clip's value is the MAX over its sampled frames. Max, not
  mean: a subtitle or title card on any sampled frame means the clip carries burned-in text, and with a mean
  the same subtitle would score 1/3 of its size when it shows in one of three frames, so a threshold would
  depend on how long the text stays up. The price is that one false detection on one frame sets the value.
  Boxes are PP-OCR's DB text-line boxes, which include DB's "unclip" margin around the glyphs (about a third
  of the line height), so a one-line subtitle of 30 px glyphs on a 640x360 frame scores about 0.05-0.08.
  A box counts when its detection score (mean text probability inside it) is >= `min_box_score` and, unless
  `detect_only`, its recognised text has confidence >= `min_text_score`: on the shared test videos the
  detector alone marks a 23%-of-frame patch of bicycle spokes as text (detection score 0.66, recognised as
  one CJK character at 0.37), which the recognition check removes.
* `ocr_text` (string): the recognised lines with confidence >= `min_text_score`, frame by frame in reading
  order (top to bottom, left to right), whitespace-normalised, de-duplicated across frames (a line whose
  letters and digits match an earlier line's, case-insensitively, or, for lines of 8 or more of them, are
  >= 85% similar to one, is dropped), joined with newlines and cut to `max_text_chars` characters. NULL when
  no line passes, and always NULL with `detect_only`.

The models are RapidOCR's (package `rapidocr_onnxruntime`, 1.4.x): PP-OCRv4 text detection (DB) and
recognition (CTC), ONNX weights shipped inside the wheel, loaded once per stage instance. The detector runs at
the frame's own aspect ratio scaled so its longer side is `det_side` (sides rounded to multiples of 32);
RapidOCR's own default instead scales the SHORTER side up to 736 (1312x736 for a 640x360 frame), which cost
about 400 ms per frame here against 35-75 ms, and on the shared test videos read the same text except one
small "29" in bikes.mp4. The angle classifier (upside-down text) is not used.

Measured on this project's 2-core CPU box (1 ONNX thread, machine shared with other jobs, so timings vary by
2x with load): detection at 640 px takes 35-75 ms per frame and recognition 25-60 ms per line. Per clip of
3 frames: 130-260 ms with no text (bikes, bigbuckbunny, fades), 230-290 ms for testvideo.mp4 (a two-line
watermark on 2 of 3 frames), 290-420 ms for counter.mp4 (two lines on every frame), 300-400 ms for 176x144
carphone (upscaled to 640 for the detector). `detect_only` saves the recognition time (about 150 ms per clip
on the text clips). Batching frames or lines through the models was measured SLOWER on this CPU (detection
46 ms/frame alone vs 73 ms/frame in batches of 6; recognition 23 vs 35 ms/line), so the defaults send one
frame and one line at a time; `det_batch`/`rec_batch` raise that where batching pays (a GPU build of
onnxruntime).

What it does not do: it does not judge (the filter stage does); it sees only 3 frames, so text shown between
them is missed; small text (a few pixels high at `det_side`) is missed; in `detect_only` mode textures can pass
for text (the bicycle-spokes patch above gives 0.23). Its recogniser is the Chinese+English PP-OCRv4 model:
Latin text is read well but spaces between words are often dropped ("HELLOWORLD"), and scripts other than
Latin and Chinese are not read.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import pick_frames, row_frames  # noqa: F401 - pick_frames re-exported

log = logging.getLogger(__name__)

TEXT_AREA = "text_area"
OCR_TEXT = "ocr_text"

#: The frames this stage reads: text needs resolution, so 640 px on the longer side (the default set is 256).
FRAME_SET = FrameSpec("ocr", n=3, max_side=640)
FRAMES_COL, SHAPE_COL = FRAME_SET.columns

_SIMILAR = 0.85  # lines at least this similar (difflib ratio of their letters and digits) count as one ...
_SIMILAR_MIN_LEN = 8  # ... when both have at least this many letters and digits ("Frame 1" vs "Frame 15" differ)


class OcrConfig(StageConfig):
    """Settings of the OCR stage.

    Args:
        max_frames: use at most this many of the clip's "ocr" frames (evenly spread, first and last kept);
            fewer frames is cheaper. The frame set itself holds 3 frames (FRAME_SET), so larger values read 3.
        det_side: longer side in pixels the detector sees each frame at (up- or downscaled, aspect kept,
            sides rounded to multiples of 32). Cost grows with its square.
        min_box_score: a detected text box counts when the mean text probability inside it is at least this
            (RapidOCR's `box_thresh`, default 0.5).
        min_text_score: a recognised line counts (for `ocr_text`, and for `text_area` unless `detect_only`)
            when the recogniser's confidence is at least this (RapidOCR's `text_score`, default 0.5).
        max_text_chars: `ocr_text` is cut to this many characters.
        max_boxes: recognise at most this many boxes per frame (the largest); bounds the cost of text-heavy
            frames. Boxes past it are not read and so count for `text_area` only with `detect_only`.
        detect_only: run only the detector (about half the cost when there is text): `text_area` then counts
            every box above `min_box_score`, and `ocr_text` is NULL.
        threads: ONNX Runtime intra-op threads per model (the stage declares one CPU).
        det_batch: frames per detector call (1 was fastest on CPU; see the module docstring).
        rec_batch: text lines per recogniser call (1 was fastest on CPU).
    """

    max_frames: int = Field(3, ge=1, le=64)
    det_side: int = Field(640, ge=64, le=2048)
    min_box_score: float = Field(0.5, ge=0.0, le=1.0)
    min_text_score: float = Field(0.5, ge=0.0, le=1.0)
    max_text_chars: int = Field(512, ge=1, le=100_000)
    max_boxes: int = Field(32, ge=1, le=1000)
    detect_only: bool = False
    threads: int = Field(1, ge=1, le=64)
    det_batch: int = Field(1, ge=1, le=64)
    rec_batch: int = Field(1, ge=1, le=64)


def det_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) the detector sees: longer side `side`, aspect kept, both rounded to multiples of 32."""
    scale = side / max(width, height)
    return max(32, int(round(width * scale / 32)) * 32), max(32, int(round(height * scale / 32)) * 32)


def box_area_fraction(boxes: list[np.ndarray], height: int, width: int) -> float:
    """Fraction of a height x width frame covered by the union of quadrilateral boxes ((4, 2) x, y points)."""
    if not boxes:
        return 0.0
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)
    return float(mask.mean())


def _key(line: str) -> str:
    return "".join(ch for ch in line.lower() if ch.isalnum())


def merge_lines(lines: list[str], max_chars: int) -> str | None:
    """Whitespace-normalised, de-duplicated lines joined by newlines and cut to `max_chars`; None if empty.

    A line is a duplicate when its letters and digits (lower-cased) equal those of a line already kept, or,
    when both have at least 8 of them, are at least 85% similar (difflib ratio; OCR misreads one glyph of a
    repeated subtitle now and then); the first spelling seen is kept.
    """
    kept: list[str] = []
    keys: list[str] = []
    for raw in lines:
        line = re.sub(r"\s+", " ", raw).strip()
        key = _key(line)
        if not key:
            continue
        if any(key == k or (min(len(key), len(k)) >= _SIMILAR_MIN_LEN
                            and difflib.SequenceMatcher(None, key, k).ratio() >= _SIMILAR) for k in keys):
            continue
        kept.append(line)
        keys.append(key)
    text = "\n".join(kept)[:max_chars].rstrip()
    return text or None


class Ocr(RowStage):
    """Per-clip on-screen text: `text_area` (max over sampled frames) and the recognised `ocr_text`.

    Loads RapidOCR's PP-OCRv4 detector and recogniser once per instance and runs them on the "ocr" frame set
    (no decoding of its own). `process_many` pools every frame and every text line of a batch of clips
    through the models. Does not decide what is kept; does not read rotated (upside-down) text.
    """

    name: ClassVar[str] = "ocr"
    Config: ClassVar[type[StageConfig]] = OcrConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = (FRAMES_COL, SHAPE_COL)
    adds: ClassVar[dict[str, pa.DataType]] = {TEXT_AREA: pa.float32(), OCR_TEXT: pa.string()}
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = (FRAME_SET,)
    uses_model: ClassVar[bool] = True
    num_cpus: ClassVar[float] = 1.0
    batch_size: ClassVar[int] = 8

    def __init__(self, cfg: StageConfig | None = None) -> None:
        super().__init__(cfg)
        try:
            from rapidocr_onnxruntime import RapidOCR  # noqa: PLC0415 - heavy import, only when the stage is used
        except ImportError as exc:
            raise ImportError(
                "the ocr stage needs RapidOCR: pip install 'rapidocr-onnxruntime>=1.3' (its wheel ships the "
                "PP-OCR ONNX weights)") from exc
        cfg = self.cfg
        self.engine = RapidOCR(intra_op_num_threads=cfg.threads, inter_op_num_threads=1, use_cls=False)
        self._det = self.engine.text_det
        self._rec = self.engine.text_rec
        self._det.postprocess_op.box_thresh = cfg.min_box_score
        self._rec.rec_batch_num = cfg.rec_batch
        log.debug("ocr: loaded RapidOCR (det %s, %d thread(s))", type(self._det).__name__, cfg.threads)

    # ------------------------------------------------------------------------------------------ models

    def detect(self, frames: list[np.ndarray]) -> list[list[tuple[np.ndarray, float]]]:
        """Text-line boxes of RGB frames: per frame a list of ((4, 2) float32 points in frame pixels, score).

        Only boxes with score >= `min_box_score` are returned, ordered top to bottom, left to right.
        """
        cfg: OcrConfig = self.cfg  # type: ignore[assignment]
        out: list[list[tuple[np.ndarray, float]]] = [[] for _ in frames]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault(det_size(f.shape[1], f.shape[0], cfg.det_side), []).append(i)
        for size, idx in groups.items():
            for start in range(0, len(idx), cfg.det_batch):
                chunk = idx[start:start + cfg.det_batch]
                x = np.stack([self._det_input(frames[i], size) for i in chunk])  # (b, 3, H, W)
                pred = self._det.infer(x)[0]  # (b, 1, H, W) text probability
                for j, i in enumerate(chunk):
                    h, w = frames[i].shape[:2]
                    boxes, scores = self._det.postprocess_op(pred[j:j + 1], (h, w))
                    found = [(self._det.order_points_clockwise(b.astype(np.float32)), float(s))
                             for b, s in zip(boxes, scores, strict=True)]
                    found = [(b, s) for b, s in found if s >= cfg.min_box_score
                             and np.linalg.norm(b[0] - b[1]) > 3 and np.linalg.norm(b[0] - b[3]) > 3]
                    found.sort(key=lambda bs: (round(float(bs[0][0][1]) / 10), float(bs[0][0][0])))
                    out[i] = found
        return out

    def _det_input(self, frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 frame -> detector input (3, H, W) float32: BGR (PaddleOCR's order), scaled to [-1, 1]."""
        bgr = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        return ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)

    def recognise(self, frames: list[np.ndarray], boxes: list[list[tuple[np.ndarray, float]]]
                  ) -> list[list[tuple[str, float]]]:
        """Text and confidence of each of the first `max_boxes` boxes (largest first) of each frame.

        Returns, per frame, one (text, confidence) per box in `boxes[i]` order; boxes past `max_boxes` get
        ("", 0.0). All lines of all frames go through the recogniser in one call (it sorts them by width).
        """
        cfg: OcrConfig = self.cfg  # type: ignore[assignment]
        crops: list[np.ndarray] = []
        where: list[tuple[int, int]] = []
        for i, (frame, found) in enumerate(zip(frames, boxes, strict=True)):
            if not found:
                continue
            bgr = np.ascontiguousarray(frame[:, :, ::-1])
            order = sorted(range(len(found)), key=lambda k: -cv2.contourArea(found[k][0]))[:cfg.max_boxes]
            picked = [found[k][0].copy() for k in order]
            crops.extend(self.engine.get_crop_img_list(bgr, picked))
            where.extend((i, k) for k in order)
        out = [[("", 0.0)] * len(found) for found in boxes]
        if crops:
            results, _ = self._rec(crops)
            for (i, k), res in zip(where, results, strict=True):
                out[i][k] = (str(res[0]), float(res[1]))
        return out

    # ------------------------------------------------------------------------------------------ rows

    def _frames(self, row: dict[str, Any]) -> list[np.ndarray]:
        return row_frames(row, FRAME_SET, "ocr", self.cfg.max_frames)

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg: OcrConfig = self.cfg  # type: ignore[assignment]
        per_row = [self._frames(r) for r in rows]
        frames = [f for fs in per_row for f in fs]
        boxes = self.detect(frames)
        texts = None if cfg.detect_only else self.recognise(frames, boxes)
        out, at = [], 0
        for row, fs in zip(rows, per_row, strict=True):
            areas, lines = [], []
            for j in range(at, at + len(fs)):
                h, w = frames[j].shape[:2]
                if texts is None:
                    counted = [b for b, _ in boxes[j]]
                else:
                    counted = [b for (b, _), (_, conf) in zip(boxes[j], texts[j], strict=True)
                               if conf >= cfg.min_text_score]
                    lines.extend(t for t, conf in texts[j] if conf >= cfg.min_text_score)
                areas.append(box_area_fraction(counted, h, w))
            at += len(fs)
            text = None if texts is None else merge_lines(lines, cfg.max_text_chars)
            out.append(dict(row, **{TEXT_AREA: max(areas), OCR_TEXT: text}))
        return out
