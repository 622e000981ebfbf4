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

import json
import logging
import time
import traceback
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

ERROR = "error"
CLIP_INDEX = "clip_index"
TIMINGS = "_timings"  # JSON {stage: seconds} carried by work rows


class InjectedFault(RuntimeError):
    """Raised by a stage on purpose (fault-injection tests)."""


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

    def __init__(self, cfg: StageConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

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

    #: Fault injection for tests (set by the runner from CLIPMILL_FAULT_INJECT="stage:uri-substring"):
    #: `process` raises InjectedFault for rows whose uri contains this substring.
    inject_fault: str | None = None

    def process(self, row: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        raise NotImplementedError

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
            if self.inject_fault and self.inject_fault in str(row.get("uri")):
                raise InjectedFault(f"injected fault for {row.get('uri')}")
            out = self.process(row)
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
        rows: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            rows.extend(self._run_row(row))
        return to_table(rows, output_schema(batch.schema, self))


def output_schema(schema: pa.Schema, stage: type[Stage] | Stage) -> pa.Schema:
    """The schema a stage returns for a given input schema: input minus `drops`, plus `adds`.

    Every output also has `error` and `_timings` (strings), whatever the input had.
    """
    own = set(stage.adds) | {ERROR, TIMINGS}
    fields = [f for f in schema if f.name not in stage.drops and f.name not in own]
    fields += [pa.field(name, typ) for name, typ in stage.adds.items()]
    fields += [pa.field(ERROR, pa.string()), pa.field(TIMINGS, pa.string())]
    return pa.schema(fields)


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly `schema` (missing keys become NULL, extra keys are dropped)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
