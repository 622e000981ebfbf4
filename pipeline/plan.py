"""Checks a recipe's stage order against the columns each stage reads and adds, before any work."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from clipmill.pipeline.registry import stage_class
from clipmill.stages.base import output_schema

if TYPE_CHECKING:
    from clipmill.pipeline.recipe import Recipe

# Columns every run starts with (one row per input).
INPUT_SCHEMA = pa.schema([
    pa.field("uri", pa.string()),
    pa.field("source_caption", pa.string()),
    pa.field("error", pa.string()),
])

# Columns the writer needs at the end of the plan.
WRITER_READS = ("video_id", "uri", "status", "clip_index")


def plan_schemas(recipe: Recipe) -> list[pa.Schema]:
    """The schema after each stage, starting with INPUT_SCHEMA (len = stages + 1)."""
    schemas = [INPUT_SCHEMA]
    for spec in recipe.stages:
        if stage_class(spec.name).level == "global":
            continue
        schemas.append(output_schema(schemas[-1], stage_class(spec.name), spec.config))
    return schemas


def check_plan(recipe: Recipe) -> None:
    """Raise RecipeError when a stage reads a column no earlier stage provides, or the writer lacks one."""
    from clipmill.pipeline.recipe import RecipeError  # noqa: PLC0415

    have = set(INPUT_SCHEMA.names)
    providers = {n: "input" for n in have}
    level = "video"
    for i, spec in enumerate(recipe.stages):
        cls = stage_class(spec.name)
        missing = [c for c in cls.reads if c not in have]
        if missing:
            hint = ", ".join(f"{c} (added by {_who_adds(c)})" for c in missing)
            raise RecipeError(
                f"{recipe.source}: stages[{i}] {spec.name} reads {hint}, which no earlier stage adds; "
                f"reorder the stages or add the missing one"
            )
        if cls.level == "clip" and level == "video":
            raise RecipeError(
                f"{recipe.source}: stages[{i}] {spec.name} works on clips, but clips exist only after "
                f"the split stage; put split before it"
            )
        if cls.level == "global" and i != len(recipe.stages) - 1 and any(
                stage_class(s.name).level != "global" for s in recipe.stages[i + 1:]):
            raise RecipeError(
                f"{recipe.source}: stages[{i}] {spec.name} runs over the whole dataset after the run; "
                f"it must come after every per-video stage"
            )
        if cls.level == "fanout":
            level = "clip"
        for c in cls.drops:
            have.discard(c)
        for c in cls.added_columns(spec.config):
            have.add(c)
            providers[c] = spec.name
    missing = [c for c in WRITER_READS if c not in have]
    if missing:
        raise RecipeError(
            f"{recipe.source}: the writer needs columns {missing}; a recipe must include the probe and split stages"
        )


def _who_adds(column: str) -> str:
    from clipmill.pipeline.registry import STAGES  # noqa: PLC0415

    for name in STAGES:
        try:
            if column in stage_class(name).adds:
                return name
        except ImportError:
            continue
    return "no stage"
