"""dedup: the global near-duplicate step, as the last stage of a recipe (also `clipmill dedup OUT`).

Unlike the other stages it does not see batches: it runs once after every clip of the run is committed,
over the whole dataset (earlier runs included), and marks `duplicate_of` in the committed clip shards
(see storage/dedup.py for the method and how it scales). It scores nothing itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from clipmill.stages.base import Stage, StageConfig


class DedupConfig(StageConfig):
    """Config of the dedup step.

    Args:
        threshold: clips whose embeddings have cosine similarity >= this are the same footage.
        block_size: at most this many clips are compared exactly at once (bounds memory).
    """

    threshold: float = Field(0.95, gt=0.0, le=1.0)
    block_size: int = Field(20_000, ge=100)


class Dedup(Stage):
    """Marks near-duplicate clips across the whole dataset; runs after the run's last commit."""

    name: ClassVar[str] = "dedup"
    Config: ClassVar[type[StageConfig]] = DedupConfig
    level: ClassVar[str] = "global"
    reads: ClassVar[tuple[str, ...]] = ("embedding",)

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise RuntimeError("dedup is a global step: the runner calls run_global(out) after the last commit")

    def run_global(self, out: str, progress: Any = None) -> dict[str, Any]:
        """Run near-duplicate marking over dataset `out`; returns the report as plain data."""
        from clipmill.storage.dedup import dedup_dataset  # noqa: PLC0415

        cfg: DedupConfig = self.cfg  # type: ignore[assignment]
        report = dedup_dataset(out, threshold=cfg.threshold, block_size=cfg.block_size, progress=progress)
        return report.to_json() if hasattr(report, "to_json") else dict(vars(report))
