"""`hidrop eval`, `train`, `analyze` and `compare`: score, train and diagnose one experiment's schedules,
and compare the scores of several evaluations.

eval, train and analyze import their platform module inside the command: torch, transformers, Ray and
DeepSpeed take seconds to import, and `hidrop --help` or a one-line config error must not wait for them."""

from __future__ import annotations

import time
from typing import List, Optional

import typer

import hidrop_platform.cli.progress as progress
import hidrop_platform.cli.views as views
from hidrop_platform.cli.options import (
    AsJson,
    OptionError,
    load_experiment,
    load_experiment_and_data,
    without_credentials,
)
from hidrop_platform.cluster.connect import stop_ray
from hidrop_platform.evaluate.compare import compare, log_comparison
from hidrop_platform.tracking.store import default_tracking_uri, tracking_uri_problem


def eval_command(
    experiment: str = typer.Argument(..., help="experiment YAML (model, schedule(s), eval section)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. eval.batch_size=4"),
    as_json: AsJson = False,
    records: Optional[str] = typer.Option(
        None, "--records", help="also write every question's record (method, answer, score, unit) to FILE.jsonl[.gz]"
    ),
):
    """Score the experiment's schedule(s) and the baselines on its benchmarks (offline ones by default), each
    score with its 95% bootstrap interval."""
    # lazy: torch and transformers
    from hidrop_platform.evaluate.runs import build_model, check_records_path, run_eval, write_records

    cfg = load_experiment(experiment, overrides)
    if records:
        check_records_path(records)
    if as_json:
        with views.stdout_to_stderr():
            report = run_eval(cfg, keep_records=bool(records))
            if records:
                write_records(report, records)
        views.print_json(report.to_dict(records=False))
        return
    with progress.status(f"loading {cfg.model.kind} model..."):
        vlm = build_model(cfg)
    with progress.eval_bar() as shown:
        report = run_eval(cfg, progress=shown, vlm=vlm, keep_records=bool(records))
    if records:
        views.print_records_written(write_records(report, records), records)
    views.print_eval(report)


def train(
    experiment: str = typer.Argument(..., help="experiment YAML (model, schedule, train and tracking sections)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. train.num_workers=2"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    restart: bool = typer.Option(
        False, "--restart", help="start afresh even if a run of this name exists (the old one is moved aside)"
    ),
    force: bool = typer.Option(False, "--force", help="continue an existing run even though the config changed"),
):
    """Train with Ray Train workers running DeepSpeed (LLaVA stage 1 or 2, schedule active), tracked in MLflow.
    Re-running the same name continues its last checkpoint when the config agrees. With train.previous_stage
    the earlier stages run first (a finished one is skipped) and each starts from the one before."""
    from hidrop_platform.train.recipe import finished, recipe_stages

    cfg = load_experiment(experiment, overrides)
    if restart and force:
        raise OptionError("--restart and --force contradict each other: pick one")
    stages = recipe_stages(cfg)
    results = []
    for stage in stages:
        last = stage is stages[-1]
        if not last and finished(stage):
            views.say_stage_skipped(stage.name, as_json)
            continue
        # --restart and --force are about the experiment named on the command line, not its earlier stages
        results.append(_train_stage(stage, as_json, restart and last, force and last))
    result = results[-1] if len(results) == 1 else {**results[-1], "stages": results}
    if as_json:
        views.print_json(result, default=str)
        return
    for done in results:  # the stages that ran (a skipped one may sit anywhere before the last)
        views.print_training(done["experiment"], done)


def _train_stage(cfg, as_json: bool, restart: bool, force: bool) -> dict:
    """One training run, with its progress bar (or none under --json); Ctrl+C exits 130 saying where it
    stands."""
    # lazy: Ray, DeepSpeed and torch
    from hidrop_platform.train.driver import TrainInterrupted, connect_for_training, run_training

    started = time.time()
    try:
        with views.stdout_to_stderr():  # Ray's start-up chatter must not reach --json output
            connect_for_training(cfg, restart, force)  # one-line errors before the progress bar
        if as_json:
            with views.stdout_to_stderr():
                return run_training(cfg, restart=restart, force=force, connected=True)
        with progress.train_bar(cfg.name) as shown:
            return run_training(cfg, progress=shown, restart=restart, force=force, connected=True)
    except TrainInterrupted as e:
        stop_ray()
        views.print_interrupted(e)
        raise typer.Exit(130) from None
    finally:  # after an error or an interrupt too: their records wait in the spool all the same
        views.warn_spooled(started)


def analyze_command(
    experiment: str = typer.Argument(
        ..., help="experiment YAML (model, eval.benchmarks for calibration, analyze section)"
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. analyze.samples=16"),
    as_json: AsJson = False,
):
    """Layer diagnostics (S_intra, S_cross, ILVAS, exit and injection sweeps) and a proposed schedule."""
    # lazy: torch and transformers
    from hidrop_platform.evaluate.analyze import run_analyze

    cfg, base = load_experiment_and_data(experiment, overrides)
    if as_json:
        with views.stdout_to_stderr():
            result = run_analyze(cfg, base)
        views.print_json(result, default=str)
        return
    with progress.status("analyzing...") as status:
        result = run_analyze(cfg, base, progress=lambda msg: status.update(msg))
    views.print_analysis(result)


def compare_command(
    specs: List[str] = typer.Argument(..., help="FILE:METHOD[=LABEL] per method, from hidrop eval --records files"),
    reference: str = typer.Option(..., "--reference", help="the label every relative score is against"),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="a label (e.g. blind) every other is compared with per benchmark and family"
    ),
    relative: Optional[str] = typer.Option(
        None,
        "--relative",
        help="comma-separated benchmarks the relative score averages (default: all shared but the probes)",
    ),
    resamples: int = typer.Option(1000, "--resamples", help="bootstrap resamples"),
    track: Optional[str] = typer.Option(
        None, "--track", help="also log the comparison to this MLflow experiment (read by hidrop report)"
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="with --track; default: the local store ./mlruns/mlflow.db"
    ),
    as_json: AsJson = False,
):
    """Methods of different evaluations (e.g. two trained models) paired on the questions they share:
    scores per benchmark and family, relative scores and every pairwise difference with 95% bootstrap
    intervals; with --baseline, where each label is significantly above it."""
    if track and tracking_uri:  # before the bootstrap, not after it
        problem = tracking_uri_problem(tracking_uri, "--tracking-uri")
        if problem is not None:
            raise OptionError(problem)
    over = [b.strip() for b in relative.split(",") if b.strip()] if relative else None
    result = compare(specs, reference, baseline=baseline, n_resamples=resamples, relative_over=over)
    if track:
        with views.quiet_if(as_json):
            result["run_id"] = log_comparison(
                result, without_credentials(tracking_uri) or default_tracking_uri(), track
            )
    if as_json:
        views.print_json(result)
        return
    views.print_comparison(result, reference, baseline, track)
