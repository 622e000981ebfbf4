"""What runs inside a worker process: build each stage once per process, then call it on batches.

Kept free of Ray so that the same functions run in a test or a notebook without a cluster.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import pyarrow as pa

from clipmill.pipeline.registry import stage_class
from clipmill.stages.base import Stage

log = logging.getLogger(__name__)

# One instance per (stage, config) per process: models and detectors load once per worker.
_INSTANCES: dict[tuple, Stage] = {}

FAULT_ENV = "CLIPMILL_FAULT_INJECT"

# Columns that live only inside a worker (decoded frames); dropped before rows travel to the writer.
TRANSIENT_COLUMNS = ("frames", "frames_shape")


def get_stage(name: str, config_json: str, fault: tuple[str, str] | None = None,
              timeout_s: float | None = None) -> Stage:
    """The process-wide instance of stage `name` built from its config (JSON), created on first use."""
    key = (name, config_json, fault, timeout_s)
    inst = _INSTANCES.get(key)
    if inst is None:
        cls = stage_class(name)
        inst = cls(cls.Config.model_validate(json.loads(config_json)))
        inst.inject_fault = fault
        inst.timeout_s = timeout_s
        _INSTANCES[key] = inst
    return inst


def fault_for(stage: str, spec: str | None = None) -> tuple[str, str] | None:
    """(mode, uri substring) of the fault to inject into `stage`, from CLIPMILL_FAULT_INJECT (tests only).

    Syntax: "stage:substring" (raise), "stage:hang:substring" or "stage:nan:substring"; several specs may
    be separated by ";".
    """
    spec = os.environ.get(FAULT_ENV) if spec is None else spec
    for part in (spec or "").split(";"):
        bits = part.split(":", 2)
        if len(bits) == 2 and bits[0] == stage and bits[1]:
            return ("raise", bits[1])
        if len(bits) == 3 and bits[0] == stage and bits[1] in ("raise", "hang", "nan") and bits[2]:
            return (bits[1], bits[2])
    return None


@dataclass(frozen=True)
class StageCall:
    """A picklable callable that applies one configured stage to a batch (used as a Ray task function)."""

    name: str
    config_json: str
    fault: tuple[str, str] | None = None
    timeout_s: float | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return get_stage(self.name, self.config_json, self.fault, self.timeout_s)(batch)


def drop_transient(batch: pa.Table) -> pa.Table:
    """Remove worker-only columns (decoded frame sets `frames`, `frames_<set>`, and their shapes)."""
    keep = [c for c in batch.column_names if c not in TRANSIENT_COLUMNS and not c.startswith("frames_")]
    return batch.select(keep)
