"""Safety stage: a per-clip nudity score from NudeNet's detector.

One row per clip (level "clip"). Reads the "safety" frame set (`frames_safety`, `frames_safety_shape`: 4 frames
spread over the clip, first and last included, longer side 320 px; see FRAME_SET) and adds:

* `nsfw_score` (float32, 0-1): the highest confidence the detector gives any of the counted classes
  (`classes`, default DEFAULT_CLASSES) at any of its 2100 anchor boxes in any sampled frame:
  `max over frames, anchors and counted classes of the class confidence` (YOLOv8 class scores are
  independent sigmoids, so this is a probability-like number per class, not a softmax share). No threshold
  and no NMS are applied first, so the score is continuous (an ordinary frame scores about 0.00-0.2) and NMS
  cannot hide a counted box under an overlapping face box. It equals the score of NudeNet's own top detection
  of a counted class whenever that detection exists (NudeNet reports boxes >= 0.2 labelled by their best
  class); it is higher where an anchor's best class is another one (e.g. FEMALE_BREAST_COVERED 0.6 with
  FEMALE_BREAST_EXPOSED 0.5 scores 0.5 here and reports only the covered box in NudeNet).

Counted by default (DEFAULT_CLASSES): FEMALE_BREAST_EXPOSED, FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED,
BUTTOCKS_EXPOSED, ANUS_EXPOSED. Not counted by default: MALE_BREAST_EXPOSED, BELLY_EXPOSED, ARMPITS_EXPOSED and
FEET_EXPOSED (swimwear, sport and beach footage), every *_COVERED class and FACE_FEMALE/FACE_MALE. Any of
NudeNet's 18 labels (NUDENET_LABELS) may be listed in `classes`.

The model is the YOLOv8n detector that ships inside the `nudenet` wheel (3.4.x, `320n.onnx`), run with our own
ONNX Runtime session (thread count under our control; NudeNet's own class uses every core) on frames held in
memory. Pre-processing is NudeNet's: pad the frame at the bottom/right with black to a square, resize to
320x320 (bilinear), scale to [0, 1], NCHW, RGB. One deliberate difference: NudeNet 3.4.2 swaps the channels
twice (`cvtColor(COLOR_RGBA2BGR)` then `blobFromImage(swapRB=True)`), so its own `detect` feeds BGR to a model
trained on RGB (NudeNet issue #203); we feed RGB. The labels and input size are read from the ONNX file's
metadata, so a compatible model file can be given with `model_path`.

Measured on this project's 2-core CPU box (1 ONNX thread): about 22 ms per frame whatever the batch size when
the machine was lightly loaded (about 90 ms per clip of 4 frames), about 50 ms per frame (190 ms per clip)
while it was shared with other jobs (load 4.5 on 2 cores). Pre-processing is under 2 ms per frame.

What it does not do and where it fails: there are no explicit test images in this repository (we cannot ship
any), so the tests check the code path on real ordinary footage and against NudeNet's own post-processing, not
recall on nudity. The detector sees a 16:9 frame as a 320x180 strip of a padded square, so small or distant
figures are missed. It is trained on photos: on the Big Buck Bunny excerpt in ../shared/testdata (a cartoon of
a fat, furry grey rabbit stretching) it gives FEMALE_BREAST_EXPOSED 0.66 on the frame at 2.3 s (0.73 when run
at 640 px), so that clip scores 0.22 with the default 4 frames but 0.66 when 8 are sampled: expect false
positives on cartoons and bare-looking body shapes, expect the score to depend on which frames are sampled,
and calibrate a filter threshold on your own data. Other shared test videos score 0.003-0.07. It does not judge (the
filter stage does), and it does not look at violence, gore or text.
"""

from __future__ import annotations

import ast
import importlib.resources
import logging
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from clipmill.stages.base import FrameSpec, RowStage, StageConfig
from clipmill.stages.framesets import pick_frames, row_frames  # noqa: F401 - pick_frames re-exported

log = logging.getLogger(__name__)

NSFW_SCORE = "nsfw_score"

#: The frames this stage reads: the detector's input is 320x320, so frames larger than 320 px bring nothing.
FRAME_SET = FrameSpec("safety", n=4, max_side=320)
FRAMES_COL, SHAPE_COL = FRAME_SET.columns

#: NudeNet 3.x labels, in the model's class order (also read back from the ONNX metadata at load).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)

#: Classes counted in `nsfw_score` by default: exposed sexual body parts.
DEFAULT_CLASSES = (
    "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)


class SafetyConfig(StageConfig):
    """Settings of the safety stage.

    Args:
        classes: NudeNet labels whose confidence counts for `nsfw_score` (see NUDENET_LABELS).
        max_frames: use at most this many of the clip's "safety" frames (evenly spread, first and last kept).
            The frame set holds 4 frames (FRAME_SET), so larger values read 4.
        model_path: a NudeNet-compatible YOLOv8 detector in ONNX (labels and input size in its metadata);
            None = the `320n.onnx` inside the installed `nudenet` wheel.
        threads: ONNX Runtime intra-op threads (the stage declares one CPU).
        batch_frames: frames per model call; on CPU the cost per frame did not depend on it.
    """

    classes: tuple[str, ...] = DEFAULT_CLASSES
    max_frames: int = Field(4, ge=1, le=64)
    model_path: str | None = None
    threads: int = Field(1, ge=1, le=64)
    batch_frames: int = Field(16, ge=1, le=256)

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"list at least one class; allowed: {', '.join(NUDENET_LABELS)}")
        unknown = [c for c in value if c not in NUDENET_LABELS]
        if unknown:
            raise ValueError(f"unknown NudeNet class(es) {unknown}; allowed: {', '.join(NUDENET_LABELS)}")
        return value


def preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 frame (h, w, 3) -> detector input (3, size, size) float32 in [0, 1], RGB.

    As NudeNet: pad at the bottom and right with black to a square, then resize bilinearly to size x size.
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (h, w, 3), got shape {frame.shape}")
    h, w = frame.shape[:2]
    side = max(h, w)
    square = cv2.copyMakeBorder(frame, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    if side != size:
        square = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    return square.astype(np.float32).transpose(2, 0, 1) / 255.0


def class_confidences(raw: np.ndarray) -> np.ndarray:
    """Detector output (b, 4 + n_classes, anchors) -> per frame, each class's highest confidence (b, n_classes).

    Rows 0-3 of the output are box centre x, centre y, width, height; rows 4.. are per-class sigmoid scores.
    """
    if raw.ndim != 3 or raw.shape[1] <= 4:
        raise ValueError(f"expected detector output (batch, 4 + classes, anchors), got {raw.shape}")
    return raw[:, 4:, :].max(axis=2)


class Safety(RowStage):
    """Per-clip `nsfw_score`: the highest confidence NudeNet's detector gives a counted class in any frame.

    Loads the detector once per instance and runs it on the "safety" frame set (no decoding of its own);
    `process_many` batches the frames of several clips through one model call. Does not decide what is kept.
    """

    name: ClassVar[str] = "safety"
    Config: ClassVar[type[StageConfig]] = SafetyConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = (FRAMES_COL, SHAPE_COL)
    adds: ClassVar[dict[str, pa.DataType]] = {NSFW_SCORE: pa.float32()}
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = (FRAME_SET,)
    uses_model: ClassVar[bool] = True
    num_cpus: ClassVar[float] = 1.0
    batch_size: ClassVar[int] = 16

    def __init__(self, cfg: StageConfig | None = None) -> None:
        super().__init__(cfg)
        import onnxruntime as ort  # noqa: PLC0415 - heavy import, only when the stage is used

        cfg = self.cfg
        path = Path(cfg.model_path) if cfg.model_path else _bundled_model()
        if not path.is_file():
            raise FileNotFoundError(f"safety.model_path: no model file at {path} (set it to a NudeNet ONNX file, "
                                    "or leave it empty to use the one inside the nudenet wheel)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = _labels(meta, path)
        self.size = _input_size(meta)
        missing = [c for c in cfg.classes if c not in self.labels]
        if missing:
            raise ValueError(f"safety.classes: {missing} are not classes of {path}; it has {', '.join(self.labels)}")
        self.counted = np.array([self.labels.index(c) for c in cfg.classes])
        log.debug("safety: loaded %s (%d classes, input %d px)", path, len(self.labels), self.size)

    def detector_output(self, frames: list[np.ndarray]) -> np.ndarray:
        """Raw detector output for RGB frames: (len(frames), 4 + classes, anchors) float32."""
        cfg: SafetyConfig = self.cfg  # type: ignore[assignment]
        outs = []
        for start in range(0, len(frames), cfg.batch_frames):
            x = np.stack([preprocess(f, self.size) for f in frames[start:start + cfg.batch_frames]])
            outs.append(self.session.run(None, {self.input_name: x})[0])
        raw = np.concatenate(outs)
        if raw.shape[1] != 4 + len(self.labels):
            raise ValueError(f"detector output has {raw.shape[1]} rows, expected 4 + {len(self.labels)} classes")
        return raw

    def frame_scores(self, frames: list[np.ndarray]) -> np.ndarray:
        """Per frame, the highest confidence of any counted class: (len(frames),) float32 in [0, 1]."""
        return class_confidences(self.detector_output(frames))[:, self.counted].max(axis=1)

    def _frames(self, row: dict[str, Any]) -> list[np.ndarray]:
        return row_frames(row, FRAME_SET, "safety", self.cfg.max_frames)

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.process_many([row])[0]

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        per_row = [self._frames(r) for r in rows]
        scores = self.frame_scores([f for fs in per_row for f in fs])
        out, at = [], 0
        for row, fs in zip(rows, per_row, strict=True):
            score = float(np.clip(scores[at:at + len(fs)].max(), 0.0, 1.0))
            at += len(fs)
            out.append(dict(row, **{NSFW_SCORE: score}))
        return out


def _bundled_model() -> Path:
    try:
        root = importlib.resources.files("nudenet")
    except ModuleNotFoundError as exc:
        raise ImportError("the safety stage needs NudeNet's detector: pip install 'nudenet>=3.4' (its wheel ships "
                          "320n.onnx), or set safety.model_path to a NudeNet ONNX file") from exc
    return Path(str(root / "320n.onnx"))


def _labels(meta: dict[str, str], path: Path) -> list[str]:
    """Class names from Ultralytics ONNX metadata (`names`: "{0: 'A', 1: 'B'}"); NudeNet's list if absent."""
    if "names" not in meta:
        log.warning("safety: %s has no class names in its metadata; assuming NudeNet's 18 labels", path)
        return list(NUDENET_LABELS)
    try:
        names = ast.literal_eval(meta["names"])
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"safety: cannot read class names from {path} metadata: {meta['names']!r}") from exc
    if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
        raise ValueError(f"safety: class names in {path} metadata are not {{0: name, ...}}: {meta['names']!r}")
    return [str(names[i]) for i in range(len(names))]


def _input_size(meta: dict[str, str]) -> int:
    """Square input side from Ultralytics metadata (`imgsz`: "[320, 320]"); 320 if absent."""
    try:
        size = ast.literal_eval(meta.get("imgsz", "[320, 320]"))
    except (ValueError, SyntaxError):
        return 320
    side = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] != size[1]:
        raise ValueError(f"safety: the model's input must be square, metadata says imgsz={size}")
    return side
