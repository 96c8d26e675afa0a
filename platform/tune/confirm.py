"""Confirmation on unseen questions (`tune.confirm`): once the sweep is done, the seeds and the best
searched front trials are evaluated again, with all tokens and blind, on questions the search never saw;
each confirmed trial's run gets confirm/... metrics, the parent run the optimism gap (search minus
confirmed) and the held-out records. Runs in the driver."""

from __future__ import annotations

from typing import Callable, Optional

from hidrop.evaluation.harness import REFERENCE, EvalError
from hidrop.evaluation.registry import get_benchmark
from hidrop.evaluation.subsets import unseen_select
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import (
    EvalSetupError,
    benchmarks_for,
    build_model,
    finite_interval,
    held_out_pass,
    log_records,
    seen_overlap,
)
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.tracker import Tracker
from hidrop_platform.tune.errors import TuneSetupError
from hidrop_platform.tune.space import trial_config
from hidrop_platform.tune.summary import SweepReference, SweepResult, TrialRecord


def confirm_benchmarks(cfg: ExperimentConfig) -> list:
    """The confirmation's benchmarks: `tune.confirm.benchmarks`, or each search benchmark with
    `limit_factor` x its limit (the seen questions are removed when it runs)."""
    c = cfg.tune.confirm
    specs = c.benchmarks
    if specs is None:
        specs = []
        for b in cfg.eval.benchmarks:
            limit = b.limit or get_benchmark(b.name, seed=cfg.seed, **b.options).limit  # its own default
            if limit is None:
                raise TuneSetupError(
                    f"tune.confirm: the search evaluates all of {b.name}, so no question is left unseen; "
                    "give it a limit in eval.benchmarks or name held-out ones in tune.confirm.benchmarks"
                )
            specs.append(b.model_copy(update={"limit": limit * c.limit_factor}))
    return benchmarks_for(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"benchmarks": specs})}))


def _seen(reference: SweepReference) -> dict[str, list[str]]:
    """Question ids the search evaluates, per benchmark (every rung's are among them)."""
    return {b: [r["id"] for r in rows] for b, rows in reference.records.get(REFERENCE, {}).items()}


def check_confirm(cfg: ExperimentConfig, reference: SweepReference) -> None:
    """Every confirmation benchmark has questions the search will not see (raises TuneSetupError)."""
    select = unseen_select(_seen(reference))
    for bench in confirm_benchmarks(cfg):
        try:
            left = select(bench, bench.samples())
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise TuneSetupError(f"tune.confirm: benchmark {bench.name!r}: {str(e).splitlines()[0]}") from None
        if not left:
            raise TuneSetupError(
                f"tune.confirm: benchmark {bench.name!r} has no question the search does not see; "
                "raise tune.confirm.limit_factor or name held-out benchmarks in tune.confirm.benchmarks"
            )


def confirm_into(
    summary: SweepResult,
    cfg: ExperimentConfig,
    base: dict,
    reference: SweepReference,
    parent,
    note: Optional[Callable] = None,
) -> None:
    """`summary.confirm` from `confirm_front`; when the confirmation fails, the sweep's own results
    stand: what failed is said there and in the summary's notes."""
    try:
        summary.confirm = confirm_front(cfg, base, summary, reference, parent, note)
    except TuneSetupError as e:
        summary.confirm = {"rows": [], "notes": [str(e)]}
        summary.notes = [*summary.notes, str(e)]


def confirm_front(
    cfg: ExperimentConfig, base: dict, summary: SweepResult, reference: SweepReference, parent, note=None
) -> dict:
    """Re-evaluate the seeds and the top_k searched front trials, with all tokens and blind, on questions
    the search never saw (checked by id); log confirm/... metrics into each trial's run. Returns the
    search-vs-confirmed table and the optimism gap (search minus confirmed) of the searched winners."""
    picks = _picks(summary.trials, cfg.tune.confirm.top_k)
    if not picks:
        return {"rows": [], "notes": ["nothing to confirm: no finished seed or front trial"]}
    if note:
        note(f"confirming {len(picks)} schedules on held-out questions")
    seen = _seen(reference)
    schedules = {r.label: trial_config(base, r.overrides).main_schedule for r in picks}
    try:
        named = [sch.model_copy(update={"name": label}) for label, sch in schedules.items()]
        report = held_out_pass(cfg, build_model(cfg), named, confirm_benchmarks(cfg), seen)
    except (EvalSetupError, EvalError) as e:
        raise TuneSetupError(f"tune.confirm: {str(e).splitlines()[0]}") from None
    ref = report.reference_row()
    overlap = seen_overlap(report, seen)
    if overlap:  # unseen_select makes this impossible; a confirmation must never read a searched question
        raise TuneSetupError(f"tune.confirm: {overlap} held-out questions were seen by the search")
    rows = []
    for r in picks:
        row = ref if schedules[r.label].is_vanilla() else report.method(r.label)
        confirmed = _confirmed_metrics(row, ref, report.samples_evaluated)
        run_id = getattr(r, "run_id", None)  # an extra: set when the trial's run is known
        if run_id and cfg.tracking.enabled:
            _log_confirmed(parent, run_id, confirmed)
        rows.append(_confirm_row(r, row, ref, confirmed))
    gaps = [x["gap"] for x in rows if not x["seed"] and x["gap"] is not None]
    out = {
        "benchmarks": {b: len(e.records or []) for b, e in ref.benchmarks.items()},
        "overlap": overlap,
        "reference_scores": ref.scores(),
        "rows": rows,
        "optimism_gap": sum(gaps) / len(gaps) if gaps else None,
        "notes": report.notes,
    }
    if out["optimism_gap"] is not None:
        parent.log_metrics({N.OPTIMISM_GAP: out["optimism_gap"]}, step=0)
    log_records(parent, report, N.CONFIRM_DIR)  # the held-out questions of every confirmed schedule
    return out


def _picks(trials: list[TrialRecord], top_k: int) -> list[TrialRecord]:
    """The trials to confirm: every finished seed, then the top_k searched front trials by score that are
    above blind level."""
    outcomes = [r for r in trials if r.is_outcome()]
    winners = sorted(
        (r for r in outcomes if r.pareto and not r.seed and not r.blind_level),
        key=lambda r: -r.relative_score,
    )[:top_k]
    return [r for r in outcomes if r.seed] + winners


def _confirmed_metrics(row, ref, samples: int) -> dict:
    """A confirmed schedule's held-out metrics (the all-tokens row has no interval or blind level)."""
    confirmed = {
        N.RELATIVE_SCORE: row.relative_score,
        **N.per_benchmark(N.SCORE, row.scores()),
        N.SAMPLES: samples,
    }
    if finite_interval(row.relative_interval) and row is not ref:
        confirmed[N.RELATIVE_SCORE_LOW], confirmed[N.RELATIVE_SCORE_HIGH] = row.relative_interval
    if row.above_blind is not None and row is not ref:
        confirmed[N.BLIND_LEVEL] = float(not row.above_blind)
    return confirmed


def _log_confirmed(parent, run_id: str, confirmed: dict) -> None:
    """confirm/... metrics into the confirmed trial's own run."""
    spool_dir = str(parent.spool_path.parent)
    run = Tracker(parent.tracking_uri, parent.experiment, run_id=run_id, spool_dir=spool_dir).start()
    run.log_metrics({f"{N.CONFIRM}{k}": v for k, v in confirmed.items() if v is not None}, step=0)
    run.finish("FINISHED")


def _confirm_row(trial: TrialRecord, row, ref, confirmed: dict) -> dict:
    """One line of the search-vs-confirmed table."""
    interval = row.relative_interval if finite_interval(row.relative_interval) and row is not ref else [None, None]
    return {
        "label": trial.label,
        "seed": trial.seed,
        "vision_tflops": trial.vision_tflops,
        "search": [trial.relative_score, trial.relative_score_lo, trial.relative_score_hi],
        "confirmed": [row.relative_score, *interval],
        "gap": None if row.relative_score is None else trial.relative_score - row.relative_score,
        "blind_level": confirmed.get(N.BLIND_LEVEL),
    }
