"""CLI commands of the recaption subsystem: `clipmill caption OUT` and `clipmill expand "PROMPT"`.

Registered in pipeline/cli.py's `_COMMANDS`; heavy imports (torch, transformers, the stages) stay inside the
command functions so that `clipmill --help` stays fast.
"""

from __future__ import annotations

import json
import sys
import time

import click


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"clipmill: error: {msg}", err=True)
    sys.exit(code)


def _stage_configs(recipe: str, need_caption: bool):  # noqa: ANN202 - (caption cfg | None, expand cfg | None, frame set)
    from clipmill.pipeline.recipe import RecipeError, load_recipe  # noqa: PLC0415
    from clipmill.stages.base import FrameSpec  # noqa: PLC0415

    try:
        rec = load_recipe(recipe)
    except RecipeError as exc:
        _fail(f"bad recipe: {exc}")
    cap, exp, frames = rec.stage("caption"), rec.stage("expand"), rec.stage("frames")
    if need_caption and cap is None:
        _fail(f"recipe {recipe!r} has no caption stage; add '- caption: {{backend: ...}}' or use --recipe default")
    spec = None
    if frames is not None:
        for e in frames.config.extra_sets:
            if e.name == "caption":
                spec = FrameSpec("caption", n=e.n, fps=e.fps, max_side=e.max_side)
    return (cap.config if cap else None), (exp.config if exp else None), spec


class _Bar:
    """Progress on stderr: a rich bar on a terminal, a line every 10 s otherwise."""

    def __init__(self, live: bool, what: str) -> None:
        self.live, self.what = live, what
        self._bar = self._task = None
        self._last = 0.0

    def __enter__(self) -> _Bar:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn  # noqa: PLC0415

            self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        elif done == total or time.monotonic() - self._last > 10:
            self._last = time.monotonic()
            click.echo(f"clipmill: {self.what}: {done}/{total} clips", err=True)


@click.command("caption")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--recipe", default="default", show_default=True,
              help="Recipe whose caption (and expand) stage settings to use: bundled name or YAML path.")
@click.option("--where", default=None, help="SQL condition over the clips view, e.g. \"caption IS NULL\".")
@click.option("--all-clips", is_flag=True, help="Also caption clips the filter rejected (default: kept clips).")
@click.option("--redo", is_flag=True, help="Caption again clips this model already captioned without error.")
@click.option("--expand/--no-expand", "do_expand", default=True, show_default=True,
              help="Also rewrite prompt_short/prompt_long (when the recipe has an expand stage).")
@click.option("--progress/--no-progress", default=None, help="Live progress (default: when stderr is a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def caption(out: str, recipe: str, where: str | None, all_clips: bool, redo: bool, do_expand: bool,
            progress: bool | None, as_json: bool) -> None:
    """Re-caption the clips of dataset OUT (new model, or failed rows) without rewriting their media.

    Shards are rewritten atomically one by one; interrupted, the same command resumes where it stopped
    (clips already captioned by the same model are skipped unless --redo).
    """
    from clipmill.recaption.backends import BackendUnavailable  # noqa: PLC0415
    from clipmill.recaption.dataset import recaption_dataset  # noqa: PLC0415
    from clipmill.storage.query import QueryError  # noqa: PLC0415
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415

    cap, exp, spec = _stage_configs(recipe, need_caption=True)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _Bar(show, "captioning") as bar:
            report = recaption_dataset(out, cap, exp if do_expand else None, where=where, all_clips=all_clips,
                                       redo=redo, frame_set=spec, progress=bar)
    except DatasetError as exc:
        _fail(str(exc))
    except QueryError as exc:
        _fail(f"bad --where: {str(exc).splitlines()[0]}")
    except (BackendUnavailable, ValueError, ImportError, OSError) as exc:
        _fail(f"cannot caption: {exc}")
    except KeyboardInterrupt:
        click.echo(f"\nclipmill: interrupted; finished shards are committed. Run the same command again to resume "
                   f"{out}.", err=True)
        sys.exit(130)
    r = report.to_json()
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    click.echo(f"captioned {r['captioned']} of {r['selected']} selected clips with {r['caption_model']} "
               f"({r['skipped_done']} already done, {r['caption_errors']} failed; "
               f"{r['shards_rewritten']} of {r['shards']} shards rewritten, {r['seconds']:.1f} s)")
    if r["prompt_model"]:
        click.echo(f"prompts by {r['prompt_model']} ({r['prompt_errors']} failed)")
    for why, n in sorted(r["errors"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:6d}  {why}")
    if r["caption_errors"]:
        click.echo(f"next: clipmill caption {out} --recipe {recipe} --where \"caption IS NULL\"  (retries the failed)")


@click.command("expand")
@click.argument("prompt")
@click.option("--recipe", default="default", show_default=True,
              help="Recipe whose expand stage settings (backend, model) to use: bundled name or YAML path.")
@click.option("--json", "as_json", is_flag=True, help="Print short, long and model as JSON.")
def expand(prompt: str, recipe: str, as_json: bool) -> None:
    """Expand a short PROMPT into the dense kind of caption the model was trained on (what the sampler uses)."""
    from clipmill.recaption.backends import BackendUnavailable  # noqa: PLC0415
    from clipmill.recaption.core import expand_prompt  # noqa: PLC0415

    _, exp, _ = _stage_configs(recipe, need_caption=False)
    try:
        res = expand_prompt(prompt, exp)
    except (BackendUnavailable, ValueError, ImportError, OSError) as exc:
        _fail(f"cannot expand: {exc}")
    if as_json:
        click.echo(json.dumps({"short": res.short, "long": res.long, "model": res.model, "error": res.error}))
        return
    click.echo(res.long)
    click.echo(f"(short: {res.short} | model: {res.model}{' | fell back: ' + res.error if res.error else ''})",
               err=True)
