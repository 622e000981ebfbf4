"""`clipmill select` and `clipmill export`: click commands over storage/select.py and storage/export.py.

Registered in pipeline/cli.py's `_COMMANDS`; heavy imports (pyarrow, duckdb) happen inside the commands.
"""

from __future__ import annotations

import sys
import time

import click


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"clipmill: error: {msg}", err=True)
    sys.exit(code)


class _Progress:
    """Progress on stderr: a rich bar on a terminal, otherwise a line every 10 s (and at the end)."""

    def __init__(self, what: str, live: bool | None) -> None:
        self.what = what
        self.live = sys.stderr.isatty() if live is None else live
        self._bar = None
        self._task = None
        self._last = time.monotonic()
        self._t0 = time.monotonic()

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total or None, completed=done)
            return
        now = time.monotonic()
        if now - self._last >= 10 or (total and done >= total and now - self._t0 >= 10):
            self._last = now
            click.echo(f"clipmill: {self.what}: {done}/{total} clips, {now - self._t0:.0f} s", err=True)


WHERE_HELP = ('SQL condition on the `clips` view (subqueries over `videos` allowed). Default: "kept" (only clips '
              'that passed the filter); "true" selects every clip.')


@click.command("select")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--where", "where", default="kept", show_default=True, help=WHERE_HELP)
@click.option("-o", "--output", "dest", required=True, type=click.Path(), help="The subset dataset directory.")
@click.option("--shard-mb", type=click.FloatRange(min=1e-3), default=256.0, show_default=True,
              help="Commit a shard once it holds this many MB of clip media.")
@click.option("--progress/--no-progress", default=None, help="Live progress (default: when stderr is a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def select_command(out: str, where: str, dest: str, shard_mb: float, progress: bool | None, as_json: bool) -> None:
    """Write the clips of dataset OUT matching --where (and their videos' rows) as a new dataset.

    The subset has the same on-disk contract (verify, sql, stats, export and the trainer read it) and records
    its source and WHERE in run.json. An existing -o is resumed only when it is a subset of the same OUT and
    WHERE; any other non-empty -o is refused.
    """
    import json  # noqa: PLC0415

    from clipmill.storage.select import SelectError, select_subset  # noqa: PLC0415
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415

    try:
        with _Progress("select", progress) as bar:
            report = select_subset(out, where, dest, shard_mb=shard_mb, progress=bar)
    except (SelectError, DatasetError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {dest}: {exc.strerror or exc}; free space or fix the path, then run the same "
              f"command again to resume")
    except KeyboardInterrupt:
        click.echo(f"\nclipmill: interrupted; the shards committed to {dest} are kept. Run the same command again "
                   f"to resume.", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        click.echo(report.summary())
        if report.selected_clips == 0:
            click.echo("note: no clip matched; the subset is an empty dataset", err=True)


@click.command("export")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["webdataset", "jsonl-mp4", "hf"]), required=True,
              help="webdataset: bucketed tar shards; jsonl-mp4: MP4 files + metadata.jsonl/open_sora.csv; "
                   "hf: Parquet + dataset card for `datasets`.")
@click.option("--where", "where", default="kept", show_default=True, help=WHERE_HELP)
@click.option("-o", "--output", "dest", required=True, type=click.Path(), help="New (or empty) export directory.")
@click.option("--text", "text", type=click.Choice(["auto", "caption", "prompt_long", "prompt_short",
                                                   "source_caption"]), default="auto", show_default=True,
              help="Which clip text becomes the sample's text (auto: first non-empty in that order).")
@click.option("--shard-mb", type=click.FloatRange(min=1e-3), default=512.0, show_default=True,
              help="Largest tar (webdataset) or Parquet file (hf) in MB.")
@click.option("--progress/--no-progress", default=None, help="Live progress (default: when stderr is a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_command(out: str, fmt: str, where: str, dest: str, text: str, shard_mb: float, progress: bool | None,
                   as_json: bool) -> None:
    """Export the clips of dataset OUT matching --where for other trainers (written atomically to -o).

    Clips without media (not kept by the recipe) are skipped and counted.
    """
    import json  # noqa: PLC0415

    from clipmill.storage.export import export_dataset  # noqa: PLC0415
    from clipmill.storage.select import SelectError  # noqa: PLC0415
    from clipmill.storage.shards import DatasetError  # noqa: PLC0415

    try:
        with _Progress(f"export {fmt}", progress) as bar:
            report = export_dataset(out, fmt, dest, where=where, text=text, shard_mb=shard_mb, progress=bar)
    except (SelectError, DatasetError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the export {dest}: {exc.strerror or exc}; free space or fix the path and run again")
    except KeyboardInterrupt:
        click.echo(f"\nclipmill: interrupted; nothing was written to {dest}. Run the command again.", err=True)
        sys.exit(130)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else report.summary())
    if report.exported == 0:
        click.echo("note: no clip was exported (an empty selection, or no selected clip has media); DIR holds only "
                   "its index" + (" and an empty Parquet file, which `datasets` refuses to load" if fmt == "hf"
                                  else ""), err=True)
