"""`clipmill report OUT [-o report.html]`: write the self-contained HTML report of a dataset (storage/report.py).

Only click is imported at module level, so registering this command keeps `clipmill --help` fast.
"""

from __future__ import annotations

import sys

import click


@click.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML file to write (replaced atomically).")
@click.option("--gallery", type=click.IntRange(min=0), default=48, show_default=True,
              help="Kept clips sampled into the gallery.")
@click.option("--per-reason", type=click.IntRange(min=0), default=8, show_default=True,
              help="Dropped clips sampled per reject reason.")
@click.option("--max-media-mb", type=click.FloatRange(min=0), default=40.0, show_default=True,
              help="Cap on the clip video bytes embedded in the page (0: thumbnails only).")
def report(out: str, output: str, gallery: int, per_reason: int, max_media_mb: float) -> None:
    """Write a self-contained HTML report of dataset OUT: funnel, rejects by reason, score histograms with
    the recipe's thresholds, a playable gallery of kept clips, samples of dropped clips, distributions and
    stage timings. The file opens offline in any browser.
    """
    from clipmill.storage.report import ReportConfig, ReportError, write_report  # noqa: PLC0415

    cfg = ReportConfig(gallery=gallery, per_reason=per_reason, max_media_mb=max_media_mb)
    try:
        summary = write_report(out, output, cfg, progress=lambda msg: click.echo(msg, err=True))
    except ReportError as exc:
        click.echo(f"clipmill: error: {exc}", err=True)
        sys.exit(2)
    click.echo(
        f"wrote {summary.path} ({summary.bytes / 2**20:.1f} MB) in {summary.seconds:.2f} s: {summary.clips:,} clips, "
        f"{summary.kept:,} kept; gallery {summary.gallery}, dropped samples {summary.reject_samples}, "
        f"{summary.media_embedded} playable ({summary.media_bytes / 2**20:.1f} MB of video)"
    )
