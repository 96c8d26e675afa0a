"""`hidrop tune` and `hidrop proxy`: search the schedule space with Ray Tune, and ask whether a cheap
sweep ranks schedules the way a costly one does.

Both import their platform module inside the command: Ray, torch and scipy take seconds to import, and
`hidrop --help` or a one-line config error must not wait for them."""

from __future__ import annotations

import time
from typing import List, Optional

import typer

import hidrop_platform.cli.progress as progress
import hidrop_platform.cli.search_views as search_views
import hidrop_platform.cli.views as views
from hidrop.errors import UserError
from hidrop_platform.cli.options import AsJson, load_experiment_and_data, without_credentials
from hidrop_platform.cluster.connect import stop_ray


def tune_command(
    experiment: str = typer.Argument(..., help="experiment YAML with a tune section (space, algorithm, objective)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. tune.num_samples=8"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep (finished trials are kept)"),
    as_json: AsJson = False,
):
    """Ray Tune search over schedules; every trial is an MLflow run under the sweep's parent run."""
    # lazy: Ray Tune, torch and transformers
    from hidrop_platform.tune.driver import connect_for_tune, run_tune

    cfg, base = load_experiment_and_data(experiment, overrides)
    started = time.time()
    try:
        with views.stdout_to_stderr():  # Ray's start-up chatter must not reach --json output
            placement = connect_for_tune(cfg, resume)  # one-line cluster errors before the progress bar
        if as_json:
            with views.stdout_to_stderr():
                summary = run_tune(cfg, base, resume=resume, placement=placement)
        else:
            with progress.sweep_bar() as shown:
                summary = run_tune(cfg, base, resume=resume, progress=shown, placement=placement)
    except KeyboardInterrupt as e:
        stop_ray()  # before the message: a second Ctrl+C now cannot cut Ray's shutdown short
        detail = f" ({e})" if str(e) else ""
        raise UserError(
            f"sweep interrupted{detail}; finished trials are kept. Continue with: hidrop tune {experiment} --resume"
        ) from None
    finally:  # after an error or an interrupt too: their records wait in the spool all the same
        views.warn_spooled(started)
    if as_json:
        views.print_json(summary.to_dict(), default=str)
        return
    search_views.print_sweep(summary)


def proxy_command(
    cheap: str = typer.Argument(
        ..., help="the cheap sweep (e.g. training-free): its folder, or its name under runs/tune"
    ),
    costly: str = typer.Argument(..., help="the sweep it should predict (e.g. trained), over the same space"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="where the trials' records are; default: each sweep's own store"
    ),
    resamples: int = typer.Option(1000, "--resamples", help="bootstrap resamples over the questions"),
    as_json: AsJson = False,
):
    """Does the cheap sweep rank schedules like the costly one? Trials matched by their overrides; Spearman
    and Kendall with 95% intervals over the questions, and the regret of taking the cheap sweep's pick."""
    # lazy: scipy
    from hidrop_platform.tune.rank_agreement import compare_sweeps

    result = compare_sweeps(cheap, costly, tracking_uri=without_credentials(tracking_uri), n_resamples=resamples)
    if as_json:
        views.print_json(result)
        return
    search_views.print_rank_agreement(result)
