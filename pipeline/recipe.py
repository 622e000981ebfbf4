"""Recipes: YAML that names the stages, their order and parameters, validated before any video is touched.

A recipe file looks like:

    name: default
    description: ...
    stages:
      - probe: {}
      - split: {detector: default, min_s: 2.0, max_s: 10.0}
      - transcode: {max_side: 512}
    write: {media: kept, shard_videos: 64}
    runtime: {num_cpus: null}

Each stage entry is a one-key mapping from a stage name to its config. Loading turns the YAML into frozen
typed models: unknown keys, wrong types and bad ranges fail with a message naming the key, the value and
what is allowed. Loading never executes anything from the file (yaml.safe_load only).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipmill.pipeline.registry import STAGES, stage_class
from clipmill.stages.base import StageConfig


class RecipeError(ValueError):
    """A recipe that cannot run; the message says which key is wrong and what is allowed."""


class WriteConfig(BaseModel):
    """How results are written.

    Args:
        media: which clips keep their MP4 bytes in the shard: "kept" (default), "all" or "none".
        thumbnails: store a JPEG thumbnail per clip.
        shard_videos: commit a shard after this many videos (smaller = finer resume, more files).
        shard_mb: or once the pending shard holds this many MB of clip media, whichever comes first.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    media: Literal["kept", "all", "none"] = "kept"
    thumbnails: bool = True
    shard_videos: int = Field(64, ge=1, le=100_000)
    shard_mb: float = Field(256.0, gt=0)


class RuntimeConfig(BaseModel):
    """Where and how the local Ray runs (ignored for most keys when joining a cluster).

    Args:
        num_cpus: CPUs the embedded local Ray may use (None = all cores of this machine).
        object_store_mb: object store size of the embedded local Ray (None = Ray's default, capped at 2 GB).
        max_task_retries: how often a crashed worker task is retried before its video is ledgered failed.
        video_timeout_s: a stage that spends longer than this on one video (or one clip) fails it with
            reason "<stage>: StageTimeout" and the run goes on (None = no limit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_cpus: int | None = Field(None, ge=1)
    object_store_mb: int | None = Field(None, ge=64)
    max_task_retries: int = Field(2, ge=0, le=20)
    video_timeout_s: float | None = Field(600.0, gt=0)


class StageSpec(BaseModel):
    """One stage of a recipe: its name and validated config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    config: StageConfig


class Recipe(BaseModel):
    """A validated recipe."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    description: str = ""
    source: str = ""
    stages: tuple[StageSpec, ...]
    write: WriteConfig = WriteConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (for run.json)."""
        return {
            "name": self.name, "description": self.description, "source": self.source,
            "stages": [{s.name: s.config.model_dump(mode="json")} for s in self.stages],
            "write": self.write.model_dump(mode="json"), "runtime": self.runtime.model_dump(mode="json"),
        }

    def stage(self, name: str) -> StageSpec | None:
        """The stage of that name, or None."""
        return next((s for s in self.stages if s.name == name), None)


def _fmt_pydantic(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        key = f"{where}.{loc}" if loc else where
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "(none)"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate recipe data (as loaded from YAML) into a Recipe; RecipeError on any problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys name, stages, write, runtime")
    top = {"name", "description", "stages", "write", "runtime"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(sorted(top))}")
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{source}: stages must be a non-empty list of one-key mappings like '- probe: {{}}'")
    specs = []
    for i, entry in enumerate(raw):
        where = f"{source}: stages[{i}]"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{where}: expected a one-key mapping like '- split: {{min_s: 2}}', got {entry!r}")
        (name, cfg), = entry.items()
        if name not in STAGES:
            raise RecipeError(f"{where}: unknown stage {name!r}; allowed: {', '.join(STAGES)}")
        cls = stage_class(name)
        try:
            config = cls.Config.model_validate(cfg or {})
        except ValidationError as exc:
            raise RecipeError(
                f"{_fmt_pydantic(f'{where}.{name}', exc)}; keys of {name}: {_allowed_keys(cls.Config)}"
            ) from None
        specs.append(StageSpec(name=name, config=config))
    specs = _with_frame_sets(specs, source)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{source}: stage(s) {dupes} listed twice; each stage may appear once")
    try:
        write = WriteConfig.model_validate(data.get("write") or {})
    except ValidationError as exc:
        raise RecipeError(f"{_fmt_pydantic(f'{source}: write', exc)}; keys: {_allowed_keys(WriteConfig)}") from None
    try:
        runtime = RuntimeConfig.model_validate(data.get("runtime") or {})
    except ValidationError as exc:
        raise RecipeError(
            f"{_fmt_pydantic(f'{source}: runtime', exc)}; keys: {_allowed_keys(RuntimeConfig)}"
        ) from None
    recipe = Recipe(
        name=str(data.get("name") or Path(source).stem), description=str(data.get("description") or ""),
        source=source, stages=tuple(specs), write=write, runtime=runtime,
    )
    from clipmill.pipeline.plan import check_plan  # noqa: PLC0415 - plan imports this module's types

    check_plan(recipe)
    return recipe


def _with_frame_sets(specs: list[StageSpec], source: str) -> list[StageSpec]:
    """Give the frames stage every frame set that the recipe's other stages declare (FrameSpec)."""
    needed = [(s.name, fs) for s in specs for fs in stage_class(s.name).frame_sets]
    if not needed:
        return specs
    at = next((i for i, s in enumerate(specs) if s.name == "frames"), None)
    if at is None:
        who = sorted({name for name, _ in needed})
        raise RecipeError(f"{source}: stage(s) {who} read decoded frames; add '- frames: {{}}' before them")
    from clipmill.stages.frames import FrameSetConfig  # noqa: PLC0415

    cfg = specs[at].config
    have = {e.name for e in cfg.extra_sets} | {"default"}
    extra = list(cfg.extra_sets)
    for _, fs in needed:
        if fs.name not in have:
            extra.append(FrameSetConfig(name=fs.name, n=fs.n, fps=fs.fps, max_side=fs.max_side))
            have.add(fs.name)
    out = list(specs)
    out[at] = StageSpec(name="frames", config=cfg.model_copy(update={"extra_sets": tuple(extra)}))
    return out


def bundled_recipes() -> list[str]:
    """Names of the recipes that ship with clipmill."""
    root = importlib.resources.files("clipmill.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | os.PathLike = "default") -> Recipe:
    """Load a bundled recipe by name ("default") or a YAML file by path; RecipeError when invalid."""
    text: str
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} not found; bundled recipes: {', '.join(bundled_recipes())}")
        text, source = p.read_text(encoding="utf-8"), str(p)
    else:
        res = importlib.resources.files("clipmill.recipes") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise RecipeError(
                f"no bundled recipe named {str(name_or_path)!r}; bundled: {', '.join(bundled_recipes())} "
                f"(or give a path to a .yaml file)"
            )
        text, source = res.read_text(encoding="utf-8"), f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    return parse_recipe(data, source)
