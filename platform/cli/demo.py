"""`hidrop demo`: the quickstart, from the size options to the printed report.

The demo module is imported inside the command: it brings in Ray, torch and transformers, which take
seconds, and `hidrop --help` must not wait for them."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

import hidrop_platform.cli.progress as progress
import hidrop_platform.cli.search_views as search_views
import hidrop_platform.cli.views as views
from hidrop.errors import UserError
from hidrop_platform.cli.options import AsJson, OptionError
from hidrop_platform.storage import write_problem


def _chosen_size(sizes: dict, limits: dict, size: str, trials, samples, train_steps):
    """The --size preset with --trials, --samples and --train-steps applied, each checked against its range."""
    if size not in sizes:
        raise OptionError(f"--size must be one of {', '.join(sizes)}, not {size!r}")
    chosen = sizes[size]
    for option, name, value in (
        ("--trials", "searched", trials),
        ("--samples", "easy_vqa", samples),
        ("--train-steps", "train_steps", train_steps),
    ):
        if value is not None:
            least = 0 if name == "train_steps" else 1
            if value < least:
                raise OptionError(f"{option} must be >= {least}, not {value}")
            if value > limits[name]:  # a typo of a few zeros would run for days
                raise OptionError(f"{option} must be at most {limits[name]} (a local demo), not {value}")
            chosen = dataclasses.replace(chosen, **{name: value})
    return chosen


def demo_command(
    size: str = typer.Option(
        "default",
        help="small (~4 min on 2 cores), default (~9 min) or large (24 trials x 162 questions, 40 training steps)",
    ),
    trials: Optional[int] = typer.Option(None, help="searched trials after the 6 presets (overrides --size)"),
    samples: Optional[int] = typer.Option(None, help="easy-vqa questions per trial (overrides --size)"),
    train_steps: Optional[int] = typer.Option(None, help="steps per training run; 0 skips training (overrides --size)"),
    out_dir: str = typer.Option("reports/demo", "--out", help="where the report is written"),
    as_json: AsJson = False,
):
    """The quickstart: presets + a small schedule search, two short trainings, and the report (all local)."""
    # lazy: Ray, torch and transformers
    from hidrop_platform.demo import DEMO_MAX, SIZES, DemoProgress, run_demo
    from hidrop_platform.train.driver import TrainInterrupted

    chosen = _chosen_size(SIZES, DEMO_MAX, size, trials, samples, train_steps)
    # before minutes of search and training; runs/ and mlruns/ go into the working directory
    for what, folder in ((f"--out {out_dir}", out_dir), ("the working directory (runs/, mlruns/)", ".")):
        problem = write_problem(folder)
        if problem is not None:
            raise OptionError(f"{what}: {problem}")
    try:
        if as_json:
            with views.stdout_to_stderr():
                result = run_demo(chosen, out_dir)
        else:
            with progress.demo_bar(DemoProgress) as shown:
                result = run_demo(chosen, out_dir, progress=shown)
    except (KeyboardInterrupt, TrainInterrupted):  # the latter: Ctrl+C during one of its trainings
        raise UserError("demo interrupted; what finished is in MLflow (hidrop ui) and ./runs/demo") from None
    if as_json:
        views.print_json(result, default=str)
        return
    search_views.print_demo(result)
