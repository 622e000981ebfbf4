"""`clipmill check-generated FILE`: report the C2PA manifest and the invisible watermark of a generated video.

Exit status: 0 when a manifest or a watermark was found, 1 when neither was, 2 when the file cannot be read.
"""

from __future__ import annotations

import json
import sys

import click


@click.command("check-generated")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--trust-anchors", type=click.Path(dir_okay=False),
              help="PEM file of CA certificates to trust (e.g. ~/.config/clipmill/c2pa/ca.pem for videos signed "
                   "with the local certificate).")
def check_generated_cmd(file: str, as_json: bool, trust_anchors: str | None) -> None:
    """Report the C2PA manifest (present, valid, trusted, AI-generated) and watermark (payload, bit accuracy)."""
    from clipmill.dit.mark import MarkError, check_generated, format_check  # noqa: PLC0415

    try:
        result = check_generated(file, trust_anchors=trust_anchors)
    except MarkError as exc:
        click.echo(f"clipmill: error: {exc}", err=True)
        sys.exit(2)
    click.echo(json.dumps(result, indent=1, default=str) if as_json else format_check(result))
    found = result["c2pa"]["present"] or result["watermark"].get("detected", False)
    if not found:
        click.echo("no C2PA manifest and no clipmill watermark found", err=True)
    sys.exit(0 if found else 1)
