"""The `hidrop` command line: app.py builds it, one module per group of commands (config, run, search,
store, demo, bench) parses and runs them, views.py and progress.py print."""

from hidrop_platform.cli.app import app  # noqa: F401  (the console script's entry point)
