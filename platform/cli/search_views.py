"""What `hidrop tune`, `proxy` and `demo` print: the trials of a sweep, the held-out confirmation, two
sweeps' rank agreement and the demo's summary. Printed on views.out, looked up at each call so that a
test's console is used."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from rich.table import Table

import hidrop_platform.cli.views as views
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.summary import CONFIRM_COLUMNS, SweepResult, TrialRecord, confirm_rows, table_rows


def _questions_cell(trial: TrialRecord) -> str:
    """How many questions a trial answered, marked when the search stopped it early."""
    return f"{trial.samples or 0:.0f}" + (" (stopped)" if trial.status == N.STOPPED_EARLY else "")


def _print_held_out(confirm: dict, *, no_wrap_trial: bool, gap_suffix: str) -> None:
    """A search's held-out confirmation table and the optimism gap of its winners."""
    questions = ", ".join(f"{b} {n}" for b, n in confirm["benchmarks"].items())
    held = Table(title=f"Held-out confirmation: {questions} questions the search never saw")
    for col in CONFIRM_COLUMNS:
        held.add_column(col, justify="left" if col == "trial" else "right", no_wrap=no_wrap_trial and col == "trial")
    for row in confirm_rows(confirm):
        held.add_row(*row)
    views.out.print(held)
    if confirm.get("optimism_gap") is not None:
        views.out.print(
            f"optimism gap of the searched winners (search - confirmed): {confirm['optimism_gap']:+.1f}{gap_suffix}"
        )


def print_sweep(summary: SweepResult) -> None:
    """`hidrop tune`: the finished trials by cost, the reference and blind levels, and the sweep's findings."""
    rows = summary.trials
    benches = list(summary.reference_scores)
    table = Table(
        title=f"Sweep {summary.sweep}: {len(rows)} trials ({summary.failed} failed), "
        f"{summary.rejected} invalid samples rejected, {summary.concurrency} at a time, "
        f"{summary.wall_time_s:.0f} s"
    )
    cols = ("trial", "front", "relative score [95% CI]", *benches, "questions", "avg tokens", "vision TFLOPs")
    cols += ("overrides",)
    for col in cols:
        table.add_column(col, justify="left" if col in ("trial", "overrides") else "right")
    ok = sorted((r for r in rows if r.relative_score is not None), key=lambda r: r.vision_tflops)
    for row in table_rows(ok):
        r = row.trial
        table.add_row(
            row.label,
            row.front,
            row.relative,
            *[f"{r.scores.get(b, float('nan')):.1f}" for b in benches],
            _questions_cell(r),
            f"{r.avg_vision_tokens:.1f}",
            f"{r.vision_tflops:.4g}",
            _overrides_cell(r),
        )
    views.out.print(table)
    views.out.print(
        "reference (all tokens): "
        + ", ".join(f"{b} {v:.1f}" for b, v in summary.reference_scores.items())
        + "; blind baseline: "
        + format_interval(summary.blind_relative_score, summary.blind_relative_interval)
        + "% relative"
    )
    for r in rows:
        if r.status == N.FAILED:
            views.out.print(f"[red]failed[/] {r.label}: {getattr(r, 'error', '')}")
    _print_sweep_findings(summary)


def _overrides_cell(r: TrialRecord) -> str:
    """A searched trial's sampled values (schedule.x=..., floats to 4 digits); empty for a seed."""
    if r.seed:
        return ""
    return ", ".join(
        f"{k.removeprefix('schedule.')}={v:.4g}" if isinstance(v, float) else f"{k.removeprefix('schedule.')}={v}"
        for k, v in r.overrides.items()
    )


def _print_sweep_findings(summary: SweepResult) -> None:
    """Below the trials table: rejections, notes, the front's legend, discoveries and the held-out check."""
    for reason, count in summary.rejections.items():
        views.out.print(f"[dim]rejected {count}x: {reason}[/]")
    for n in summary.notes:
        views.out.print(f"[yellow]note:[/] {n}")
    views.out.print(f"{summary.valid_share * 100:.0f}% of uniformly random samples of the space are valid schedules")
    if summary.has("best_under_budget"):
        views.out.print(f"best under the vision-TFLOPs budget: {summary.best_under_budget or 'none fits'}")
    views.out.print(
        "front: clear = with significance (no cheaper-or-equal trial's interval reaches its lower bound); "
        "yes = on the estimates only; blind level = not significantly above blind (no discovery)"
    )
    views.out.print(
        f"discoveries (searched, above blind): {', '.join(summary.discoveries) or 'none'}; "
        f"with significance: {', '.join(summary.significant) or 'none'}"
    )
    confirm = summary.confirm
    if confirm and confirm.get("rows"):
        _print_held_out(confirm, no_wrap_trial=False, gap_suffix=" points")
    if summary.questions_run:
        views.out.print(f"questions scored by the trials: {summary.questions_run} (method x question pairs)")
    views.out.print(
        f"Pareto front: {', '.join(summary.pareto)}. Parent MLflow run {summary.parent_run_id} "
        f"({summary.tracking_uri}); plot and table in {summary.sweep_dir}/summary"
    )


def print_rank_agreement(result: dict) -> None:
    """`hidrop proxy`: both sweeps' scores and ranks per schedule, the rank correlations and the regret."""
    a, b = result["sweeps"]
    n = ", ".join(f"{k} {v}" for k, v in result["benchmarks"].items())
    table = Table(title=f"{result['schedules']} schedules in both sweeps, paired on {n} questions")
    for col in ("schedule", f"{a} [95%]", "rank", f"{b} [95%]", "rank"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["overrides"].items())
        (sa, sb), (ia, ib) = r["scores"], r["intervals"]
        table.add_row(label, format_interval(sa, ia), str(r["ranks"][0]), format_interval(sb, ib), str(r["ranks"][1]))
    views.out.print(table)
    views.out.print(
        f"Spearman {format_interval(result['spearman'], result['spearman_interval'])}, Kendall "
        f"{format_interval(result['kendall'], result['kendall_interval'])} (intervals over the questions, "
        f"not over the choice of schedules)",
        highlight=False,
    )
    lo, hi = result["regret_interval"]
    views.out.print(
        f"{a}'s pick {result['pick']['labels'][1]} scores {result['pick']['scores'][1]:.1f} in {b}; the best there, "
        f"{result['best']['labels'][1]}, {result['best']['scores'][1]:.1f}: regret {result['regret']:.1f} "
        f"[{lo:.1f}, {hi:.1f}]; the two picks coincide in {100 * result['same_pick_share']:.0f}% of resamples",
        highlight=False,
    )
    for note in result["notes"]:
        views.out.print(f"[dim]note: {note}[/]", highlight=False)


def print_demo(result: dict) -> None:
    """`hidrop demo`: the searched schedules, the held-out check, the trained models and where to look next."""
    # the demo's document carries the trials' fields (demo.TRIAL_FIELDS): the same record, unvalidated
    trials = [TrialRecord.model_construct(**t) for t in result["trials"]]
    rows = sorted((t for t in trials if t.relative_score is not None), key=lambda t: t.vision_tflops)
    table = Table(title=f"hidrop demo: {len(rows)} schedules on the mini-LLaVA ({result['wall_time_s']:.0f} s)")
    for col in ("schedule", "front", "relative score [95% CI]", "questions", "avg vision tokens", "vision TFLOPs"):
        table.add_column(col, justify="left" if col == "schedule" else "right", no_wrap=col == "schedule")
    for row in table_rows(rows):
        t = row.trial
        table.add_row(
            row.label,
            row.front,
            row.relative,
            _questions_cell(t),
            f"{t.avg_vision_tokens:.1f}",
            f"{t.vision_tflops:.4g}",
        )
    views.out.print(table)
    blind = format_interval(result["blind_relative_score"], result.get("blind_relative_interval"))
    views.out.print(
        f"blind (no image): {blind}% relative: a schedule whose interval reaches into that band is 'blind level'. "
        "front: clear = with significance; yes = on the estimates only"
    )
    for n in result.get("notes", []):
        views.out.print(f"[yellow]note:[/] {n}")
    confirm = result.get("confirm") or {}
    if confirm.get("rows"):
        _print_held_out(confirm, no_wrap_trial=True, gap_suffix="")
    trained = result.get("trained")
    if trained:
        paired = Table(title="Trained with the schedule active, on the same questions (paired)")
        for col in ("model", "scores [95% CI]", "relative score [95% CI]"):
            paired.add_column(col, justify="left" if col == "model" else "right")
        for r in trained["rows"]:
            scores = ", ".join(f"{b} {format_interval(v, r['intervals'][b])}" for b, v in r["scores"].items())
            paired.add_row(r["label"], scores, format_interval(r["relative_score"], r["relative_interval"]))
        views.out.print(paired)
    for t in result["trainings"]:
        views.out.print(f"trained {t['method']}: {t['wall_time_s']:.0f} s, final loss {t['loss']:.3f}")
    views.out.print(f"[bold]Report:[/] {Path(result['report']['html']).resolve()}")
    views.out.print(
        f"[bold]Browse every run:[/] {_own_command()} ui   (from this folder; it prints the address, "
        "then open the experiment 'demo')",
        highlight=False,
    )


def _own_command() -> str:
    """How the user ran us (`.venv/bin/hidrop`, `hidrop`), so the printed next command works as typed."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "hidrop":
        return "hidrop"
    if os.sep in argv0 and shutil.which("hidrop") != os.path.abspath(argv0):
        return os.path.relpath(argv0) if not os.path.relpath(argv0).startswith("..") else argv0
    return "hidrop"
