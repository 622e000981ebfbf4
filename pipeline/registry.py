"""Stage names -> stage classes, imported lazily so that listing names loads no model code."""

from __future__ import annotations

import importlib

from clipmill.stages.base import Stage

STAGES: dict[str, str] = {
    "probe": "clipmill.stages.probe:Probe",
    "split": "clipmill.stages.split:Split",
    "transcode": "clipmill.stages.transcode:Transcode",
    "frames": "clipmill.stages.frames:Frames",
    "quality": "clipmill.stages.quality:Quality",
    "motion": "clipmill.stages.motion:Motion",
    "ocr": "clipmill.stages.ocr:Ocr",
    "safety": "clipmill.stages.safety:Safety",
    "aesthetics": "clipmill.stages.aesthetics:Aesthetics",
    "embedding": "clipmill.stages.embedding:Embedding",
    "filter": "clipmill.stages.filter:Filter",
    "caption": "clipmill.stages.caption:Caption",
    "expand": "clipmill.stages.expand:Expand",
    "dedup": "clipmill.stages.dedup:Dedup",
}


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass registered under `name`; KeyError naming the allowed names otherwise."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    module, _, attr = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
