"""The stage protocol: one small class per stage, called on a batch of rows (an Arrow table).

A stage declares what it reads and what it adds, so the runner can check a recipe before any video is
touched. It loads what it needs once, in `__init__` (one instance per worker process), and its call
takes a batch and returns a batch. Stages never import Ray or one another; they share only columns.

Rows flowing through a run are "work rows": before the split stage one row per input video; from the
split stage on, one row per clip, each carrying its video's columns (`clip_index` = -1 marks the single
row of a video that has no clip: rejected, failed, or all shots too short). A row whose `error` is set
is passed through untouched by every later stage; the writer then ledgers its video as `failed`. So is
a row whose `status` is "rejected" (set by probe for unreadable inputs, with `reason`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

ERROR = "error"
CLIP_INDEX = "clip_index"
TIMINGS = "_timings"  # JSON {stage: seconds} carried by work rows


class InjectedFault(RuntimeError):
    """Raised by a stage on purpose (fault-injection tests)."""


@dataclass(frozen=True)
class FrameSpec:
    """A set of decoded frames a stage needs; the frames stage decodes each clip once for all sets.

    Args:
        name: set name; the frames stage writes `frames_<name>` and `frames_<name>_shape` ("default" is
            `frames`/`frames_shape`).
        n: that many evenly spaced frames, first and last included; or
        fps: frames at this rate over the clip (at least 2).
        max_side: longer side of the decoded frames in pixels.
    """

    name: str
    n: int | None = None
    fps: float | None = None
    max_side: int = 256

    def __post_init__(self) -> None:
        if (self.n is None) == (self.fps is None):
            raise ValueError(f"frame set {self.name!r}: give exactly one of n or fps")
        if (self.n is not None and self.n < 1) or (self.fps is not None and self.fps <= 0) or self.max_side < 8:
            raise ValueError(f"frame set {self.name!r}: n >= 1, fps > 0 and max_side >= 8 required")

    @property
    def columns(self) -> tuple[str, str]:
        """(blob column, shape column) of this set."""
        base = "frames" if self.name == "default" else f"frames_{self.name}"
        return base, f"{base}_shape"


class StageConfig(BaseModel):
    """Base of every stage's typed, frozen config; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(ABC):
    """A pipeline stage: `Config`, declared columns and resources, and `__call__(batch) -> batch`.

    Class attributes:
        name: the stage name used in recipes.
        level: "video" (rows are videos), "clip" (rows are clips) or "fanout" (video rows in, clip rows out).
        reads: columns this stage needs in its input.
        adds: columns (with Arrow types) this stage adds to every row it returns.
        drops: columns it removes (e.g. decoded frames no later stage needs).
        num_cpus, num_gpus, batch_size: resources per call and rows per batch.
        uses_model: True for stages that hold a model (the runner gives them an actor pool).
        frame_sets: decoded frame sets this stage reads (the frames stage provides them).
    """

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    level: ClassVar[str] = "clip"
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[dict[str, pa.DataType]] = {}
    drops: ClassVar[tuple[str, ...]] = ()
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    batch_size: ClassVar[int] = 1
    uses_model: ClassVar[bool] = False
    frame_sets: ClassVar[tuple[FrameSpec, ...]] = ()

    def __init__(self, cfg: StageConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    @classmethod
    def added_columns(cls, cfg: StageConfig | None = None) -> dict[str, pa.DataType]:
        """Columns added for a given config (most stages: `adds`; the frames stage depends on its sets)."""
        return dict(cls.adds)

    @abstractmethod
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Process one batch of work rows and return the resulting rows."""


class RowStage(Stage):
    """A stage written per row: implement `process(row) -> dict | list[dict]`.

    `__call__` skips rows that carry an error (and, for clip-level stages, rows without a clip),
    turns an exception raised by `process` into that row's `error` ("<stage>: <Type>: <message>"),
    and builds the output table with the declared column types so every batch has one schema.
    A fan-out stage returns a list of rows per input row (an empty list is not allowed: return one
    row with `clip_index` = -1 so the video is still ledgered).
    """

    #: Fault injection for tests, set by the runner from CLIPMILL_FAULT_INJECT: (mode, uri substring) with mode
    #: "raise" (InjectedFault), "hang" (sleeps until the stage timeout) or "nan" (a NaN score).
    inject_fault: tuple[str, str] | None = None
    #: Wall-clock limit of one `process` call (one video for video/fan-out stages, one clip otherwise);
    #: set by the runner from the recipe's runtime.video_timeout_s. None = no limit.
    timeout_s: float | None = None

    def process(self, row: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        raise NotImplementedError

    def process_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Process several live rows at once (model stages override this to batch inference).

        Returns one output row per input row, in order. If it raises, `__call__` falls back to `process`
        row by row, so one bad row still fails alone. Not used by fan-out stages.
        """
        return [self.process(r) for r in rows]  # type: ignore[misc]

    def _inject(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Apply an injected fault to `row` (tests only); None when none applies."""
        if not self.inject_fault or self.inject_fault[1] not in str(row.get("uri")):
            return None
        mode = self.inject_fault[0]
        if mode == "hang":
            while True:  # a decoder that never returns; only the stage timeout ends it
                time.sleep(0.5)
        if mode == "nan":
            floats = [c for c, t in self.added_columns(self.cfg).items() if pa.types.is_floating(t)]
            if floats and self.level != "fanout":
                return dict(self.process(row), **{floats[0]: float("nan")})  # type: ignore[arg-type]
        raise InjectedFault(f"injected fault for {row.get('uri')}")

    def _live(self, row: dict[str, Any]) -> bool:
        if row.get(ERROR) or row.get("status") == "rejected":
            return False
        if self.level == "clip" and (row.get(CLIP_INDEX) is None or row[CLIP_INDEX] < 0):
            return False
        return True

    def _run_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if not self._live(row):
            return [dict(row, **{CLIP_INDEX: -1}) if self.level == "fanout" else row]
        t0 = time.perf_counter()
        try:
            with _time_limit(self.timeout_s, self.name):
                out = self._inject(row) or self.process(row)
            for r in out if isinstance(out, list) else [out]:
                _check_finite(r, self)
        except Exception as exc:  # noqa: BLE001 - per-row failures are data, recorded in `error`
            log.warning("%s failed on %s: %s", self.name, row.get("uri"), exc)
            log.debug("%s", traceback.format_exc())
            failed = dict(row, **{ERROR: f"{self.name}: {type(exc).__name__}: {exc}"})
            if self.level == "fanout":
                failed[CLIP_INDEX] = -1
            return [failed]
        rows = out if isinstance(out, list) else [out]
        if not rows:
            raise RuntimeError(f"stage {self.name} returned no row for {row.get('uri')}")
        # Seconds spent per stage travel with the rows; a fan-out stage books them on its first row only,
        # so summing a video's rows counts every stage once.
        spent = json.loads(row.get(TIMINGS) or "{}")
        spent[self.name] = spent.get(self.name, 0.0) + (time.perf_counter() - t0)
        rows = [dict(r, **{TIMINGS: json.dumps(spent) if i == 0 else None}) for i, r in enumerate(rows)]
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        schema = output_schema(batch.schema, type(self), self.cfg)
        # Large binary columns this stage neither reads nor writes (decoded frames, MP4 bytes) stay in Arrow
        # and are re-attached unchanged, instead of being copied into Python objects and back at every stage.
        carried = [] if self.level == "fanout" else [
            f.name for f in batch.schema
            if (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)) and f.name in schema.names
            and f.name not in self.reads and f.name not in self.added_columns(self.cfg)]
        rows = batch.drop_columns(carried).to_pylist() if carried else batch.to_pylist()
        batched = self._batched(rows) if self._batches() else None
        out: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            out.extend([batched[i]] if batched is not None and i in batched else self._run_row(row))
        if not carried:
            return to_table(out, schema)
        if len(out) != batch.num_rows:
            raise RuntimeError(f"stage {self.name} returned {len(out)} rows for {batch.num_rows}")
        light = to_table(out, pa.schema([f for f in schema if f.name not in carried]))
        return pa.Table.from_arrays([batch[f.name] if f.name in carried else light[f.name] for f in schema],
                                    schema=schema)

    def _batches(self) -> bool:
        return self.level != "fanout" and type(self).process_many is not RowStage.process_many

    def _batched(self, rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]] | None:
        """Run `process_many` over the live rows; None (caller goes row by row) if it raises."""
        live = [i for i, r in enumerate(rows) if self._live(r)
                and not (self.inject_fault and self.inject_fault[1] in str(r.get("uri")))]
        if len(live) < 2:
            return None
        t0 = time.perf_counter()
        try:
            with _time_limit(self.timeout_s and self.timeout_s * len(live), self.name):
                res = self.process_many([rows[i] for i in live])
            for r in res:
                _check_finite(r, self)
        except Exception as exc:  # noqa: BLE001 - retried row by row, where failures become `error`
            log.warning("%s: batch of %d failed (%s); retrying row by row", self.name, len(live), exc)
            return None
        if len(res) != len(live):
            raise RuntimeError(f"stage {self.name}.process_many returned {len(res)} rows for {len(live)}")
        each = (time.perf_counter() - t0) / len(live)
        done = {}
        for i, r in zip(live, res, strict=True):
            spent = json.loads(rows[i].get(TIMINGS) or "{}")
            spent[self.name] = spent.get(self.name, 0.0) + each
            done[i] = dict(r, **{TIMINGS: json.dumps(spent)})
        return done


class StageTimeout(RuntimeError):
    """A stage call ran past its time limit (runtime.video_timeout_s)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None, stage: str) -> Iterator[None]:
    """Raise StageTimeout in this thread after `seconds` (main thread only; elsewhere no limit).

    Works for Python-level loops (PyAV hands every frame back to Python); a single C call that never
    returns cannot be interrupted this way.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum: int, frame: Any) -> None:
        raise StageTimeout(f"exceeded {seconds:g} s (runtime.video_timeout_s)")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_finite(row: dict[str, Any], stage: Stage) -> None:
    """Raise ValueError when a float column the stage added is NaN or infinite (a broken model output)."""
    for col, typ in stage.added_columns(stage.cfg).items():
        v = row.get(col)
        if isinstance(v, float) and pa.types.is_floating(typ) and not math.isfinite(v):
            raise ValueError(f"{col} is {v} (the stage produced a non-finite score)")


def output_schema(schema: pa.Schema, stage: type[Stage], cfg: StageConfig | None = None) -> pa.Schema:
    """The schema a stage returns for a given input schema: input minus `drops`, plus its added columns.

    Every output also has `error` and `_timings` (strings), whatever the input had.
    """
    adds = stage.added_columns(cfg)
    own = set(adds) | {ERROR, TIMINGS}
    fields = [f for f in schema if f.name not in stage.drops and f.name not in own]
    fields += [pa.field(name, typ) for name, typ in adds.items()]
    fields += [pa.field(ERROR, pa.string()), pa.field(TIMINGS, pa.string())]
    return pa.schema(fields)


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly `schema` (missing keys become NULL, extra keys are dropped)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
