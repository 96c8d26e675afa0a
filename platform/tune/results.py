"""A finished sweep's results, in the driver: the summary `hidrop tune` returns (and prints with `--json`)
from Tune's result grid and the trial records, the best trial under the FLOPs budget, and the summary's
files under `<sweep>/summary/` (pareto.md, sweep.json, pareto.png), logged with its counts on the parent run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.pareto import plot_pareto
from hidrop_platform.tune.searcher import ScheduleSearcher
from hidrop_platform.tune.summary import (
    SweepReference,
    SweepResult,
    TrialRecord,
    confirm_markdown,
    full_fidelity,
    summarize_sweep,
    table_rows,
)
from hidrop_platform.tune.trial_runs import RUN_ID_KEY, TrialRun


def sweep_summary(
    grid,
    reference: SweepReference,
    searcher: Optional[ScheduleSearcher],
    name: str,
    at_once: int,
    wall: float,
    sweep_dir: str,
    rungs: Optional[int] = None,
) -> SweepResult:
    """Every trial of Tune's result grid, the front and where the blind baseline sits."""
    records = [_trial_row(result, sweep_dir, rungs) for result in grid]
    summary = summarize_sweep(
        records,
        reference.scores,
        reference.blind_scores,
        reference.blind_relative_interval,
        reference.blind_relative_score,
        rungs,
    )
    return SweepResult(
        sweep=name,
        trials=summary.trials,
        pareto=summary.pareto,
        significant=summary.significant,
        blind_level=summary.blind_level,
        discoveries=summary.discoveries(),
        reference_scores=reference.scores,
        blind_relative_score=summary.blind_relative_score,
        blind_relative_interval=summary.blind_relative_interval,
        rejections=dict(searcher.rejections) if searcher else {},
        rejected=sum(searcher.rejections.values()) if searcher else 0,
        failed=summary.failed,
        questions_run=int(sum(t.questions_run or 0 for t in summary.trials)),
        concurrency=at_once,
        wall_time_s=wall,
        accelerator_hours=summary.accelerator_hours,
        undefined=summary.undefined,
        notes=[*reference.notes, *_undefined_note(summary.undefined, reference.scores)],
    )


def _trial_row(result, sweep_dir: str, rungs: Optional[int]) -> TrialRecord:
    """One trial's record from its Tune result, with the MLflow run id it reported (from `trial_runs/` for
    a trial that failed before reporting anything)."""
    config = result.config or {}
    metrics = dict(result.metrics or {})
    status = N.FAILED if result.error else N.FINISHED
    if status == N.FINISHED and rungs and metrics.get(N.RUNG, rungs) < rungs:
        status = N.STOPPED_EARLY  # the multi-fidelity scheduler stopped it after a rung: an outcome
    run_id = metrics.pop(RUN_ID_KEY, None)
    if run_id is None and result.error and config:
        run_id = TrialRun.read(sweep_dir, config).run_id
    return TrialRecord.from_metrics(
        config.get("label", "?"),
        status,
        metrics,
        seed=bool(config.get("seed")),
        overrides=config.get("overrides", {}),
        **({"run_id": run_id} if run_id else {}),
        **({"error": str(result.error).strip().splitlines()[-1][:300]} if result.error else {}),
    )


def _undefined_note(labels: list[str], reference_scores: dict) -> list[str]:
    """Why finished trials have no relative score: a reported state, not a crash."""
    if not labels:
        return []
    zero = [b for b, v in reference_scores.items() if v == 0] or list(reference_scores)
    return [
        f"{len(labels)} finished trials have no relative score: the all-tokens reference scores 0 on "
        f"{', '.join(zero)} (a ratio to 0 is undefined); their per-benchmark scores are in their runs"
    ]


def best_under_budget(trials: list[TrialRecord], max_vision_tflops: float, rungs: Optional[int]) -> Optional[str]:
    """Objective `score`: the label of the best trial that ran every rung within the FLOPs budget."""
    fits = [
        r
        for r in trials
        if r.relative_score is not None and r.vision_tflops <= max_vision_tflops and full_fidelity(r, rungs)
    ]
    return max(fits, key=lambda r: r.relative_score).label if fits else None


def log_summary(parent, summary: SweepResult, sweep_dir: Path, name: str, reference: SweepReference) -> None:
    """Write `<sweep>/summary/` and log it, with the sweep's counts, on the parent run."""
    out = sweep_dir / "summary"
    out.mkdir(exist_ok=True)
    ok = [r for r in summary.trials if r.is_outcome()]
    blind = reference.blind_relative_interval
    (out / "pareto.md").write_text(_pareto_markdown(summary, ok, reference) + "\n")
    (out / "sweep.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    if ok:
        plot_pareto(
            [r.to_dict() for r in ok],  # the plot reads any rows by key (the report's too)
            out / "pareto.png",
            f"{name}: relative score vs vision TFLOPs",
            reference_lines={"blind": reference.blind_relative_score},
            reference_bands={"blind": blind} if blind else None,
        )
    for path in out.iterdir():
        parent.log_artifact(path, N.PARETO_DIR)
    parent.log_metrics(
        {
            N.TRIALS: len(summary.trials),
            N.FAILED_TRIALS: summary.failed,
            N.REJECTED_SAMPLES: summary.rejected,
            N.PARETO_SIZE: len(summary.pareto),
            N.ACCELERATOR_HOURS: summary.accelerator_hours,
            N.WALL_S: summary.wall_time_s,
        },
        step=0,
    )


def _pareto_markdown(summary: SweepResult, ok: list[TrialRecord], reference: SweepReference) -> str:
    """pareto.md: the finished trials by cost, with the front, intervals and the confirmation table."""
    lines = [
        "| trial | front | relative score [95% CI] | vision TFLOPs | avg tokens | schedule overrides |",
        "|---|---|---|---|---|---|",
    ]
    for row in table_rows(sorted(ok, key=lambda r: r.vision_tflops)):
        r = row.trial
        lines.append(
            f"| {row.label} | {row.front} | {row.relative} | {r.vision_tflops:.4g} | {r.avg_vision_tokens:.1f} | "
            f"`{json.dumps(_rounded(r.overrides))}` |"
        )
    blind = reference.blind_relative_interval
    lines += [
        "",
        "front: clear = no cheaper-or-equal trial's interval reaches its lower bound; yes = on the front of the "
        "estimates only; blind level = not significantly above answering without the image "
        f"(blind: {format_interval(reference.blind_relative_score, blind)}).",
    ]
    lines += confirm_markdown(summary.confirm or {})
    return "\n".join(lines)


def _rounded(overrides: dict) -> dict:
    """Sampled floats to 4 significant digits, for the table."""
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in overrides.items()}
