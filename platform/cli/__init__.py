"""The `hidrop` command line."""

from hidrop_platform.cli.commands import app  # noqa: F401  (the console script's entry point)
