"""The `clipmill` command line: run, detect, sql, stats.

Every command prints errors as one line that says what to do, and exits non-zero only when the command
itself could not do its job (a rejected input is not such a failure).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

log = logging.getLogger("clipmill")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"clipmill: error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clipmill")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """clipmill: turn raw videos into text-to-video training data (shots, clips, scores, Parquet, SQL)."""
    _setup_logging(verbose)


class _DatasetDir(click.Path):
    """A dataset folder, or a remote OUT URL (s3://...) whose committed files are first copied to a local cache
    (storage/remote.py); `fresh` downloads every file again (verify)."""

    def __init__(self, fresh: bool = False) -> None:
        super().__init__(exists=True, file_okay=False)
        self.fresh = fresh

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        from clipmill.storage import remote  # noqa: PLC0415

        if not remote.is_remote(str(value)):
            return super().convert(remote.file_url_path(value), param, ctx)
        from clipmill.storage.shards import DatasetError  # noqa: PLC0415

        try:
            local = remote.local_copy(str(value), fresh=self.fresh)
        except (DatasetError, ValueError) as exc:
            self.fail(str(exc), param, ctx)
        if ctx is not None:
            ctx.meta["clipmill.remote_out"] = str(value)
        return str(local)


# --------------------------------------------------------------------------------------------- run
@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Dataset directory.")
@click.option("--recipe", default="default", show_default=True, help="Bundled recipe name or a YAML path.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Process at most N new inputs.")
@click.option("--progress/--no-progress", default=None, help="Live progress (default: when stderr is a TTY).")
@click.option("--repair", is_flag=True, help="First verify OUT and quarantine broken shards, so they are re-run.")
@click.option("--storage-options", default=None, metavar="JSON",
              help="fsspec options for remote inputs/OUT, e.g. '{\"endpoint_url\": \"http://host:9000\"}' "
                   "(default: CLIPMILL_STORAGE_OPTIONS).")
def run(inputs: tuple[str, ...], out: str, recipe: str, address: str | None, limit: int | None,
        progress: bool | None, repair: bool, storage_options: str | None) -> None:
    """Run a recipe over INPUTS (files, directories, globs, or .csv/.jsonl/.parquet manifests) into OUT.

    Re-running the same command resumes: videos already committed in OUT are skipped.
    """
    from clipmill.pipeline.inputs import InputError, expand_inputs  # noqa: PLC0415
    from clipmill.pipeline.recipe import RecipeError, load_recipe  # noqa: PLC0415
    from clipmill.pipeline.runner import RunError, RunInterrupted  # noqa: PLC0415
    from clipmill.pipeline.runner import run as run_pipeline  # noqa: PLC0415
    from clipmill.storage import remote  # noqa: PLC0415
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415

    if storage_options is not None:
        try:
            remote.parse_storage_options(storage_options)
        except ValueError as exc:
            _fail(f"--storage-options: {exc}")
        os.environ[remote.STORAGE_OPTIONS_ENV] = storage_options  # stages and Ray workers read it from there
    if repair and remote.is_remote(out):
        _fail("--repair needs a local OUT; run `clipmill verify` on the remote OUT to check it")
    try:
        rec = load_recipe(recipe)
    except RecipeError as exc:
        _fail(f"bad recipe: {exc}")
    try:
        items = expand_inputs(list(inputs))
    except InputError as exc:
        _fail(str(exc))
    if not items:
        _fail("no inputs found; give video files, directories, globs or a manifest")
    if repair and Path(out).is_dir():
        from clipmill.storage.verify import repair_dataset, verify_dataset  # noqa: PLC0415

        try:
            report = verify_dataset(out)
            if not report.clean:
                click.echo(repair_dataset(out, report).format(), err=True)
        except DatasetError as exc:
            _fail(str(exc))
    show = sys.stderr.isatty() if progress is None else progress
    reporter = _Progress(show)

    def _stop(signum: int, frame: object) -> None:  # outside the streaming loop (start-up, shutdown)
        raise RunInterrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        with reporter:
            stats = run_pipeline(items, out, rec, address=address, limit=limit, on_progress=reporter.update,
                                 argv=sys.argv[1:])
    except DatasetError as exc:
        _fail(str(exc))
    except RunError as exc:
        _fail(str(exc), code=1)
    except RunInterrupted as exc:
        click.echo(f"\nclipmill: {exc}; every video that had finished is committed. Run the same command again "
                   f"to resume into {out}.", err=True)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        click.echo(f"\nclipmill: interrupted by SIGINT; every video that had finished is committed. Run the same "
                   f"command again to resume into {out}.", err=True)
        sys.exit(130)
    _print_summary(out, stats)
    # Done: a late signal while the interpreter shuts down must not turn a finished run into a killed one
    # (Python resets its handlers to the default action during finalization; ignored signals stay ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class _Progress:
    """Live progress on stderr: a rich bar on a terminal, a log line every 10 s otherwise."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self._bar = None
        self._task = None
        self._last = 0.0
        self._final_shown = False

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("videos"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("run", total=None, info="starting Ray...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, stats) -> None:  # noqa: ANN001 - RunStats
        rate = stats.video_seconds / max(stats.elapsed_s, 1e-9)
        info = (f"clips {stats.clips} kept {stats.kept} | {stats.videos / max(stats.elapsed_s, 1e-9):.2f} "
                f"videos/s, {rate:.1f}x realtime")
        if self._bar is not None:
            self._bar.update(self._task, total=stats.total, completed=stats.videos, info=info)
            return
        final = stats.videos >= stats.total
        if self._final_shown or not (final or time.monotonic() - self._last > 10):
            return
        self._last, self._final_shown = time.monotonic(), final
        eta = (stats.total - stats.videos) * stats.elapsed_s / stats.videos if stats.videos else float("nan")
        click.echo(f"clipmill: {stats.videos}/{stats.total} videos | {info} | ETA {eta:.0f} s", err=True)


def _print_summary(out: str, stats) -> None:  # noqa: ANN001 - RunStats
    s = stats.to_json()
    click.echo(f"dataset: {out if '://' in out else Path(out).resolve()}")
    skipped = f" ({s['skipped_already_committed']} already committed, skipped)" if s["skipped_already_committed"] else ""
    click.echo(f"inputs: {s['inputs']} processed{skipped}")
    st = s["status"]
    click.echo(f"videos: {st.get('done', 0)} done, {st.get('rejected', 0)} rejected, {st.get('failed', 0)} failed"
               f" ({s['video_seconds'] / 3600:.2f} h of video)")
    for reason, n in sorted(s["video_reasons"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:6d}  {reason}")
    click.echo(f"clips: {s['clips']} total, {s['kept']} kept, {s['clips'] - s['kept']} rejected")
    for reason, n in sorted(s["clip_rejects"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:6d}  {reason}")
    click.echo(f"time: {s['elapsed_s']:.1f} s, {s['shards']} shard(s) committed")
    click.echo(f"next: clipmill sql {out} \"SELECT clip_id, duration_s, kept FROM clips LIMIT 10\"")


# ------------------------------------------------------------------------------------------ detect
@main.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path())
@click.option("--detector", default="default", show_default=True,
              help="default (clipmill hybrid), content, adaptive, transnetv2, fixed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per video.")
def detect(videos: tuple[str, ...], detector: str, as_json: bool) -> None:
    """Print the shot boundaries of each VIDEO (the code the split stage uses)."""
    from clipmill.stages.shots import DETECTORS, detect_shots  # noqa: PLC0415

    if detector not in DETECTORS:
        _fail(f"unknown detector {detector!r}; allowed: {', '.join(DETECTORS)}")
    failed = 0
    for v in videos:
        try:
            res = detect_shots(v, detector)
        except Exception as exc:  # noqa: BLE001 - a bad file (FFmpeg, OS, value errors): report it, go on
            failed += 1
            _emit_detect_error(v, exc, as_json)
            continue
        cuts = [int(c) for c in res.cuts]
        trans = [[int(a), int(b)] for a, b in res.transitions]
        if as_json:
            click.echo(json.dumps({"uri": v, "fps": res.fps, "n_frames": res.n_frames, "cuts": cuts,
                                   "transitions": trans, "detector": res.detector}))
        else:
            click.echo(f"{v}: {res.n_frames} frames at {res.fps:.3f} fps ({res.detector})")
            click.echo(f"  cuts: {cuts}")
            click.echo(f"  transitions: {trans}")
    if failed == len(videos):
        sys.exit(1)


def _emit_detect_error(v: str, exc: BaseException, as_json: bool) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    if as_json:
        click.echo(json.dumps({"uri": v, "error": msg}))
    else:
        click.echo(f"{v}: cannot detect shots: {msg}", err=True)


# --------------------------------------------------------------------------------------------- sql
@main.command()
@click.argument("out", type=_DatasetDir())
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the result to FILE.")
@click.option("--allow-external", is_flag=True, help="Allow reading/writing other files and extensions.")
def sql(out: str, query: str, fmt: str, output: str | None, allow_external: bool) -> None:
    """Run a read-only SQL QUERY over the dataset OUT (views `clips` and `videos`)."""
    from clipmill.storage.query import QueryError, QueryRefused, run_query, write_result  # noqa: PLC0415

    try:
        table = run_query(out, query, allow_external=allow_external)
        write_result(table, fmt, output)
    except QueryRefused as exc:
        _fail(str(exc))
    except QueryError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------------------ verify
@main.command()
@click.argument("out", type=_DatasetDir(fresh=True))
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Hash every committed file against its commit record (reads the whole dataset).")
@click.option("--repair", is_flag=True, help="Move broken shards to OUT/_quarantine so a rerun re-processes them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(out: str, checksums: bool, repair: bool, as_json: bool) -> None:
    """Check dataset OUT against its commit records (files, sizes, checksums, rows, schema, duplicates).

    Exit 0 when it is intact, 1 when problems were found (and not repaired), 2 when it cannot be checked.
    """
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415
    from clipmill.storage.verify import repair_dataset, verify_dataset  # noqa: PLC0415

    if repair and click.get_current_context().meta.get("clipmill.remote_out"):
        _fail("--repair works on a local OUT only; a remote OUT is checked on a fresh local copy")
    try:
        report = verify_dataset(out, checksums=checksums)
        fixed = repair_dataset(out, report) if repair and not report.clean else None
    except DatasetError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"verify": report.to_json(), "repair": fixed.to_json() if fixed else None},
                              indent=1, default=str))
    else:
        click.echo(report.format())
        if fixed is not None:
            click.echo(fixed.format())
    if not report.ok and fixed is None:
        sys.exit(1)


# ------------------------------------------------------------------------------------------- dedup
@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95, show_default=True,
              help="Cosine similarity of clip embeddings at which two clips are the same footage.")
@click.option("--block-size", type=click.IntRange(min=100), default=20_000, show_default=True,
              help="At most this many clips are compared exactly at once (bounds memory).")
def dedup(out: str, threshold: float, block_size: int) -> None:
    """Mark near-duplicate clips across the whole dataset OUT (`duplicate_of` = the best copy's clip_id)."""
    from clipmill.stages.dedup import Dedup, DedupConfig  # noqa: PLC0415
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415

    try:
        report = Dedup(DedupConfig(threshold=threshold, block_size=block_size)).run_global(out)
    except DatasetError as exc:
        _fail(str(exc))
    for key, value in report.items():
        click.echo(f"{key}: {value}")


# ------------------------------------------------------------------------------------------- stats
@main.command()
@click.argument("out", type=_DatasetDir())
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(out: str, as_json: bool) -> None:
    """Counts, rejects by reason, duration and score distributions of dataset OUT."""
    from clipmill.storage.stats import dataset_stats, format_stats  # noqa: PLC0415

    s = dataset_stats(out)
    click.echo(json.dumps(s, indent=1, default=str) if as_json else format_stats(s))


# ------------------------------------------------------------------ commands that live beside their subsystem
# "module:attribute" of click commands defined elsewhere; imported when the CLI starts, so those modules must keep
# heavy imports (torch, transformers, ray) inside their command functions.
_COMMANDS: list[str] = [
    "clipmill.recaption.cli:caption",
    "clipmill.recaption.cli:expand",
    "clipmill.storage.export_cli:select_command",
    "clipmill.storage.export_cli:export_command",
    "clipmill.storage.report_cli:report",
    "clipmill.dit.cli:train_command",
    "clipmill.dit.cli:sample_command",
    "clipmill.dit.check_cli:check_generated_cmd",
]


def _register_commands() -> None:
    import importlib  # noqa: PLC0415

    for ref in _COMMANDS:
        module, _, attr = ref.partition(":")
        main.add_command(getattr(importlib.import_module(module), attr))


_register_commands()

if __name__ == "__main__":
    main()
