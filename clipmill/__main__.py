"""`python -m clipmill` runs the CLI."""

from clipmill.pipeline.cli import main

main()
