"""The `hidrop` command line.

Each command imports its own module (train, tune, evaluate, ...) inside the command function: `hidrop
--help` and a one-line config error must not wait seconds for torch, Ray and MLflow to import."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from hidrop.cost import format_tflops
from hidrop.evaluation.paper import PAPER_BENCHMARKS, paper_table
from hidrop.evaluation.results import EvalReport
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.summary import CONFIRM_COLUMNS, confirm_rows, front_mark, interval_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Vision-token schedules for LLaVA-style models.")
bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks (ratios measured in one run).")
app.add_typer(bench_app, name="bench")
# piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _stdout_to_stderr():
    """--json: stdout carries the JSON document alone. While the work runs, whatever libraries and child
    processes print (Ray's forwarded worker logs, DeepSpeed's banner, MLflow's run links) goes to stderr,
    at the Python level and at the file-descriptor level that subprocesses inherit."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _load(path: str, overrides: Optional[List[str]] = None):
    return _load_with_data(path, overrides)[0]


def _load_with_data(path: str, overrides: Optional[List[str]] = None):
    """(validated config, raw YAML mapping with the overrides): searches rebuild trial configs from the raw one."""
    from hidrop_platform.config.schema import ConfigError, load_config_data, validate_config

    try:
        base = load_config_data(path, overrides or [])
        return validate_config(base, path), base
    except ConfigError as e:
        _fail(str(e))


@app.command()
def validate(
    experiment: str = typer.Argument(..., help="experiment YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides"),
    as_json: bool = typer.Option(False, "--json", help="print the resolved config as JSON"),
):
    """Load and validate an experiment; print the resolved config, token plan, avg tokens and TFLOPs."""
    from hidrop.cost import cost_report

    cfg = _load(experiment, overrides)
    shape = cfg.model.shape
    reports = [cost_report(s, shape) for s in cfg.schedules()]
    if as_json:
        print(json.dumps({"config": cfg.model_dump(mode="json"), "schedules": reports}, indent=2))
        return
    import yaml

    out.print(
        f"[bold green]ok[/] {experiment}: [bold]{cfg.name}[/] ({cfg.model.kind}, {shape.num_layers} layers, "
        f"{shape.num_vision_tokens} vision tokens)"
    )
    out.print("[dim]resolved config:[/]")
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(), highlight=False, markup=False)
    for s, r in zip(cfg.schedules(), reports):
        out.print(
            f"  [bold]{s.name}[/]: inject L{s.inject_layer}, "
            f"exit {('L' + str(s.exit_layer)) if s.exit_layer else '-'}, "
            f"drops {[(d.after_layer, k) for d, k in zip(s.drops, s.keep_counts)]}, {s.position_mode.value} positions, "
            f"{s.selector.value}"
        )
        out.print(f"    per-layer tokens: {r['plan']}")
        out.print(
            f"    avg tokens {r['avg_vision_tokens']:.2f}, vision {format_tflops(r['vision_tflops'])} TFLOPs "
            f"({r['vision_pct_of_vanilla']:.1f}% of vanilla), whole model {format_tflops(r['model_tflops'])} TFLOPs"
        )


@app.command()
def flops(
    experiments: List[str] = typer.Argument(..., help="one or more experiment YAMLs"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Cost accounting for each experiment's model shape and schedule(s)."""
    from hidrop.cost import cost_report

    rows = []
    for path in experiments:
        cfg = _load(path)
        for s in cfg.schedules():
            rows.append({"experiment": cfg.name, "file": path, **cost_report(s, cfg.model.shape)})
    if as_json:
        print(json.dumps({"schedules": rows}, indent=2))
        return
    table = Table(title="Vision-token cost (paper formula: sum_l 4nd^2 + 2n^2d + 3ndm, MACs)")
    for col in (
        "experiment",
        "schedule",
        "avg tokens",
        "vision TFLOPs",
        "% of vanilla",
        "whole-model TFLOPs",
        "per-layer tokens",
    ):
        table.add_column(col, justify="right" if col not in ("experiment", "schedule", "per-layer tokens") else "left")
    for r in rows:
        table.add_row(
            r["experiment"],
            r["name"],
            f"{r['avg_vision_tokens']:.2f}",
            format_tflops(r["vision_tflops"]),
            f"{r['vision_pct_of_vanilla']:.1f}",
            format_tflops(r["model_tflops"]),
            r["plan"],
        )
    out.print(table)


@app.command("eval")
def eval_command(
    experiment: str = typer.Argument(..., help="experiment YAML (model, schedule(s), eval section)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. eval.batch_size=4"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    records: Optional[str] = typer.Option(
        None, "--records", help="also write every question's record (method, answer, score, unit) to FILE.jsonl[.gz]"
    ),
):
    """Score the experiment's schedule(s) and the baselines on its benchmarks (offline ones by default), each
    score with its 95% bootstrap interval."""
    from hidrop_platform.evaluate.runs import EvalSetupError, build_model, check_records_path, run_eval, write_records

    cfg = _load(experiment, overrides)
    try:
        if records:
            check_records_path(records)
        if as_json:
            with _stdout_to_stderr():
                report = run_eval(cfg, keep_records=bool(records))
                if records:
                    write_records(report, records)
            print(json.dumps(report.to_dict(records=False), indent=2))
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with out.status(f"loading {cfg.model.kind} model..."):
            vlm = build_model(cfg)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=out, transient=False) as bar:
            task = bar.add_task("evaluating", total=None)

            def progress(done: int, total: int, label: str) -> None:
                bar.update(task, completed=done, total=total, description=f"evaluating {label}")

            report = run_eval(cfg, progress=progress, vlm=vlm, keep_records=bool(records))
        if records:
            count = write_records(report, records)
            out.print(f"{count} question records written to {records}")
    except EvalSetupError as e:
        _fail(str(e))
    _print_eval(report)


@app.command()
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
    Re-running the same name continues its last checkpoint when the config agrees."""
    from hidrop_platform.train.driver import TrainInterrupted, TrainSetupError, connect_for_training, run_training

    cfg = _load(experiment, overrides)
    if restart and force:
        _fail("--restart and --force contradict each other: pick one")
    started = time.time()
    try:
        with _stdout_to_stderr():  # Ray's start-up chatter must not reach --json output
            connect_for_training(cfg, restart, force)  # one-line errors before the progress bar
        if as_json:
            with _stdout_to_stderr():
                result = run_training(cfg, restart=restart, force=force)
        else:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
            )
            with Progress(*columns, console=out) as bar:
                task = bar.add_task(f"training {cfg.name}", total=None, stats="starting Ray workers...")

                def progress(info: dict) -> None:
                    bar.update(
                        task,
                        completed=info["step"],
                        total=info["total"],
                        stats=f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  {info['samples_per_s']:.1f} samples/s",
                    )

                result = run_training(cfg, progress=progress, restart=restart, force=force)
    except TrainSetupError as e:
        _warn_spooled(started)
        _fail(str(e))
    except TrainInterrupted as e:
        _stop_ray()
        err.print(f"[bold yellow]interrupted:[/] {e}", highlight=False, soft_wrap=True)
        _warn_spooled(started)
        raise typer.Exit(130) from None
    _warn_spooled(started)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out.print(
        f"[bold green]done[/] {cfg.name} in {result['wall_time_s']:.0f} s: "
        f"loss {result['metrics'].get('loss', float('nan')):.4f} "
        f"at step {result['metrics'].get('step')}"
    )
    if result.get("continued"):
        out.print(f"  {result['continued']}")
    out.print(f"  checkpoint (DeepSpeed state): {result['checkpoint']}")
    out.print(f"  exported model (safetensors + schedule): {result['export']}")
    out.print(f"  MLflow: {result['tracking_uri']}")


def _with_interval(value: Optional[float], interval: Optional[list[float]]) -> str:
    return "-" if value is None else format_interval(value, interval)


def _print_eval(report: EvalReport) -> None:
    names = report.benchmark_names()
    table = Table(
        title=f"{report.experiment}: {report.samples_evaluated} samples on {report.device} "
        f"in {report.wall_time_s:.0f} s (relative score vs {report.reference})"
    )
    table.add_column("method")
    for n in names:
        table.add_column(n, justify="right")
    for col in ("relative %", "like", "avg vis tokens", "vision TFLOPs", "model TFLOPs", "evidence recall"):
        table.add_column(col, justify="right")
    for r in report.methods:
        recall = next((b.evidence_recall for b in r.benchmarks.values() if b.evidence_recall is not None), None)
        like = [w for w, flag in (("all tokens", r.like_reference), ("blind", r.like_blind)) if flag]
        table.add_row(
            r.method,
            *[_with_interval(r.benchmarks[n].score, r.benchmarks[n].interval) for n in names],
            _with_interval(r.relative_score, r.relative_interval),
            " & ".join(like) if r.kind != report.reference else "",
            f"{r.avg_vision_tokens:.1f}",
            format_tflops(r.vision_tflops, 4),
            format_tflops(r.model_tflops, 4),
            "-" if not recall else " / ".join(f"{x:.2f}" for x in recall),
        )
    out.print(table)
    if report.n_resamples:
        out.print(
            f"[dim]95% intervals: bootstrap over each benchmark's unit ({report.n_resamples} resamples); the relative "
            "score's is paired with all tokens on the same questions. like: indistinguishable from all tokens "
            "(its interval contains 100) / from blind (paired).[/]"
        )
    per_family = {
        r.method: {
            f"{bn}/{k.removeprefix('family/')}": v
            for bn, b in r.benchmarks.items()
            for k, v in b.figures().items()
            if k.startswith("family/")
        }
        for r in report.methods
    }
    families = sorted({f for merged in per_family.values() for f in merged})
    if families:
        fam = Table(title="per family (%)")
        fam.add_column("method")
        for f in families:
            fam.add_column(f, justify="right")
        for method, merged in per_family.items():
            fam.add_row(method, *[f"{merged[f]:.1f}" if f in merged else "-" for f in families])
        out.print(fam)
    rows = {r.method: {n: r.benchmarks[n].score for n in names if n in PAPER_BENCHMARKS} for r in report.methods}
    if any(rows.values()) and report.reference in rows:
        published = report.published or {}
        out.print(
            f"The paper's Table 1 layout (Avg % against {report.reference})"
            + (
                f", with the paper's rows for {report.published_model} (hidrop/evaluation/published.yaml)"
                if published
                else ""
            )
            + ":"
        )
        out.print(paper_table(rows, reference=report.reference, published=published), markup=False, highlight=False)
    for note in report.notes:
        out.print(f"[bold yellow]note:[/] {note}", highlight=False)


@app.command("tune")
def tune_command(
    experiment: str = typer.Argument(..., help="experiment YAML with a tune section (space, algorithm, objective)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. tune.num_samples=8"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep (finished trials are kept)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Ray Tune search over schedules; every trial is an MLflow run under the sweep's parent run."""
    from hidrop_platform.tune.driver import TuneSetupError, connect_for_tune, run_tune

    cfg, base = _load_with_data(experiment, overrides)
    started = time.time()
    try:
        with _stdout_to_stderr():  # Ray's start-up chatter must not reach --json output
            connect_for_tune(cfg, resume)  # one-line cluster errors before the progress bar
        if as_json:
            with _stdout_to_stderr():
                summary = run_tune(cfg, base, resume=resume)
            _warn_spooled(started)
            print(json.dumps(summary, indent=2, default=str))
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=out) as bar:
            task = bar.add_task("preparing", total=None)

            def progress(label: str, done: int, total: int) -> None:
                if total:
                    bar.update(task, description=f"trials (last: {label})", completed=done, total=total)
                else:
                    bar.update(task, description=label)

            summary = run_tune(cfg, base, resume=resume, progress=progress)
    except TuneSetupError as e:
        _warn_spooled(started)
        _fail(str(e))
    except KeyboardInterrupt as e:
        _stop_ray()  # before the message: a second Ctrl+C now cannot cut Ray's shutdown short
        _warn_spooled(started)
        detail = f" ({e})" if str(e) else ""
        _fail(f"sweep interrupted{detail}; finished trials are kept. Continue with: hidrop tune {experiment} --resume")
    _warn_spooled(started)
    _print_sweep(summary)


def _stop_ray() -> None:
    from hidrop_platform.cluster.connect import stop_ray

    stop_ray()


def _print_sweep(summary: dict) -> None:
    rows = [r for r in summary["trials"]]
    benches = list(summary["reference_scores"])
    table = Table(
        title=f"Sweep {summary['sweep']}: {len(rows)} trials ({summary['failed']} failed), "
        f"{summary['rejected']} invalid samples rejected, {summary['concurrency']} at a time, "
        f"{summary['wall_time_s']:.0f} s"
    )
    cols = ("trial", "front", "relative score [95% CI]", *benches, "questions", "avg tokens", "vision TFLOPs")
    cols += ("overrides",)
    for col in cols:
        table.add_column(col, justify="left" if col in ("trial", "overrides") else "right")
    ok = sorted((r for r in rows if r.get("relative_score") is not None), key=lambda r: r["vision_tflops"])
    for r in ok:
        overrides = (
            ", ".join(
                f"{k.removeprefix('schedule.')}={v:.4g}"
                if isinstance(v, float)
                else f"{k.removeprefix('schedule.')}={v}"
                for k, v in r["overrides"].items()
            )
            if not r["seed"]
            else ""
        )
        table.add_row(
            r["label"],
            front_mark(r),
            interval_text(r),
            *[f"{r['scores'].get(b, float('nan')):.1f}" for b in benches],
            f"{r.get('samples', 0):.0f}" + (" (stopped)" if r["status"] == N.STOPPED_EARLY else ""),
            f"{r['avg_vision_tokens']:.1f}",
            f"{r['vision_tflops']:.4g}",
            overrides,
        )
    out.print(table)
    out.print(
        "reference (all tokens): "
        + ", ".join(f"{b} {v:.1f}" for b, v in summary["reference_scores"].items())
        + "; blind baseline: "
        + format_interval(summary["blind_relative_score"], summary.get("blind_relative_interval"))
        + "% relative"
    )
    for r in rows:
        if r["status"] == N.FAILED:
            out.print(f"[red]failed[/] {r['label']}: {r.get('error', '')}")
    for reason, count in summary["rejections"].items():
        out.print(f"[dim]rejected {count}x: {reason}[/]")
    for n in summary["notes"]:
        out.print(f"[yellow]note:[/] {n}")
    out.print(f"{summary['valid_share'] * 100:.0f}% of uniformly random samples of the space are valid schedules")
    if "best_under_budget" in summary:
        out.print(f"best under the vision-TFLOPs budget: {summary['best_under_budget'] or 'none fits'}")
    out.print(
        "front: clear = with significance (no cheaper-or-equal trial's interval reaches its lower bound); "
        "yes = on the estimates only; blind level = not significantly above blind (no discovery)"
    )
    discoveries = summary.get("discoveries", [])
    out.print(
        f"discoveries (searched, above blind): {', '.join(discoveries) or 'none'}; "
        f"with significance: {', '.join(summary.get('significant', [])) or 'none'}"
    )
    confirm = summary.get("confirm")
    if confirm and confirm.get("rows"):
        questions = ", ".join(f"{b} {n}" for b, n in confirm["benchmarks"].items())
        held = Table(title=f"Held-out confirmation: {questions} questions the search never saw")
        for col in CONFIRM_COLUMNS:
            held.add_column(col, justify="left" if col == "trial" else "right")
        for row in confirm_rows(confirm):
            held.add_row(*row)
        out.print(held)
        if confirm.get("optimism_gap") is not None:
            out.print(
                f"optimism gap of the searched winners (search - confirmed): {confirm['optimism_gap']:+.1f} points"
            )
    if summary.get("questions_run"):
        out.print(f"questions scored by the trials: {summary['questions_run']} (method x question pairs)")
    out.print(
        f"Pareto front: {', '.join(summary['pareto'])}. Parent MLflow run {summary['parent_run_id']} "
        f"({summary['tracking_uri']}); plot and table in {summary['sweep_dir']}/summary"
    )


@app.command("analyze")
def analyze_command(
    experiment: str = typer.Argument(
        ..., help="experiment YAML (model, eval.benchmarks for calibration, analyze section)"
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. analyze.samples=16"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Layer diagnostics (S_intra, S_cross, ILVAS, exit and injection sweeps) and a proposed schedule."""
    from hidrop_platform.evaluate.analyze import AnalyzeSetupError, run_analyze

    cfg, base = _load_with_data(experiment, overrides)
    try:
        if as_json:
            with _stdout_to_stderr():
                result = run_analyze(cfg, base)
            print(json.dumps(result, indent=2, default=str))
            return
        with out.status("analyzing...") as status:
            result = run_analyze(cfg, base, progress=lambda msg: status.update(msg))
    except AnalyzeSetupError as e:
        _fail(str(e))
    c, p = result["curves"], result["proposal"]
    table = Table(
        title=f"{result['experiment']}: layer diagnostics on {c['samples']} samples ({result['wall_time_s']:.0f} s)"
    )
    sw = result["sweeps"]
    cols = ["layer", "S_intra +- se", "S_cross +- se", "ILVAS (mean) +- se"]
    cols += ["exit before L: vs all tokens [95%]", "inject at L: vs all tokens [95%]"] if sw else []
    for col in cols:
        table.add_column(col, justify="right")

    def paired(kind: str, k: int) -> str:
        lo, hi = sw[f"{kind}_diff_interval"][k]
        return f"{sw[f'{kind}_diff'][k]:+.1f} [{lo:+.1f}, {hi:+.1f}]"

    def curve(key: str, i: int) -> str:
        value, se = c[key][i], (c.get(key + "_se") or [None] * len(c[key]))[i]
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" +- {se:.3f}" if se is not None else "")

    by_layer = {l: k for k, l in enumerate(sw["layers"])} if sw else {}
    drops = {d["after_layer"] for d in p["schedule"]["drops"]}
    for l in range(1, c["num_layers"] + 1):
        mark = (
            (" inj" if l == p["schedule"]["inject_layer"] else "")
            + (" exit" if l == p["schedule"]["exit_layer"] else "")
            + (" drop" if l in drops else "")
        )
        row = [f"L{l}{mark}", curve("s_intra", l - 1), curve("s_cross", l - 1), curve("ilvas_mean", l - 1)]
        if sw:
            k = by_layer.get(l)
            row += ["-", "-"] if k is None else [paired("exit", k), paired("inject", k)]
        table.add_row(*row)
    out.print(table)
    if sw:
        a_lo, a_hi = sw["all_tokens_interval"]
        b_lo, b_hi = sw["blind_interval"]
        s_lo, s_hi = sw["signal"]["interval"]
        out.print(
            f"all tokens {sw['all_tokens']:.1f} [{a_lo:.1f}, {a_hi:.1f}], blind {sw['blind']:.1f} "
            f"[{b_lo:.1f}, {b_hi:.1f}] on {sw['questions']} questions; all tokens - blind "
            f"{sw['signal']['diff']:+.1f} [{s_lo:+.1f}, {s_hi:+.1f}]",
            highlight=False,
        )
    for warning in result.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if result["findings"]:
        out.print(f"[bold]shallow layers:[/] {result['findings']['summary']}")
    out.print(f"[bold green]proposed[/] {p['plan']} (avg {p['avg_tokens']:.2f} tokens)")
    for key, reason in p["why"].items():
        out.print(f"  {key}: {reason}", highlight=False)
    out.print(f"experiment YAML: {result['output']}/proposed.yaml; curves: {result['output']}/curves.png")


@app.command("compare")
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
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Methods of different evaluations (e.g. two trained models) paired on the questions they share:
    scores per benchmark and family, relative scores and every pairwise difference with 95% bootstrap
    intervals; with --baseline, where each label is significantly above it."""
    from hidrop_platform.evaluate.compare import CompareError, columns, compare, log_comparison, pair_text
    from hidrop_platform.tracking.store import TrackingUnavailable, default_tracking_uri, tracking_uri_problem

    if track and tracking_uri:  # before the bootstrap, not after it
        problem = tracking_uri_problem(tracking_uri, "--tracking-uri")
        if problem is not None:
            _fail(problem)
    try:
        over = [b.strip() for b in relative.split(",") if b.strip()] if relative else None
        result = compare(specs, reference, baseline=baseline, n_resamples=resamples, relative_over=over)
    except CompareError as e:
        _fail(str(e))
    if track:
        try:
            with _stdout_to_stderr() if as_json else contextlib.nullcontext():
                result["run_id"] = log_comparison(result, _clean(tracking_uri) or default_tracking_uri(), track)
        except TrackingUnavailable as e:
            _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    keys = columns(result)
    table = Table(title=f"paired on {', '.join(f'{b} {n}' for b, n in result['benchmarks'].items())} questions")
    for col in ("label", "tokens", *keys, f"relative to {reference} [95%]"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        every = {**r["scores"], **r["families"]}
        bounds = {**r["intervals"], **r["family_intervals"]}
        tokens = "-" if r["avg_vision_tokens"] is None else f"{r['avg_vision_tokens']:.1f}"
        cells = [format_interval(every[k], bounds[k]) for k in keys]
        table.add_row(r["label"], tokens, *cells, format_interval(r["relative_score"], r["relative_interval"]))
    out.print(table)
    for p in result["pairs"]:
        out.print(pair_text(p), highlight=False)
    if baseline:
        diffs = Table(title=f"minus {baseline}, paired (* : interval above 0)")
        for col in ("label", *keys):
            diffs.add_column(col, justify="right")
        for r in result["rows"]:
            if "vs_baseline" in r:
                d = r["vs_baseline"]
                diffs.add_row(
                    r["label"],
                    *(
                        f"{d[k]['difference']:+.1f} [{d[k]['interval'][0]:+.1f}, {d[k]['interval'][1]:+.1f}]"
                        + ("*" if d[k]["interval"][0] > 0 else "")
                        for k in keys
                    ),
                )
        out.print(diffs)
    for note in result["notes"]:
        out.print(f"[dim]note: {note}[/]", highlight=False)
    if result.get("run_id"):
        out.print(f"logged to MLflow experiment {track!r}, run {result['run_id']} (hidrop report {track})")


@app.command("proxy")
def proxy_command(
    cheap: str = typer.Argument(
        ..., help="the cheap sweep (e.g. training-free): its folder, or its name under runs/tune"
    ),
    costly: str = typer.Argument(..., help="the sweep it should predict (e.g. trained), over the same space"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="where the trials' records are; default: each sweep's own store"
    ),
    resamples: int = typer.Option(1000, "--resamples", help="bootstrap resamples over the questions"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Does the cheap sweep rank schedules like the costly one? Trials matched by their overrides; Spearman
    and Kendall with 95% intervals over the questions, and the regret of taking the cheap sweep's pick."""
    from hidrop_platform.tune.rank_agreement import ProxyError, compare_sweeps

    try:
        result = compare_sweeps(cheap, costly, tracking_uri=_clean(tracking_uri), n_resamples=resamples)
    except ProxyError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    a, b = result["sweeps"]
    n = ", ".join(f"{k} {v}" for k, v in result["benchmarks"].items())
    table = Table(title=f"{result['schedules']} schedules in both sweeps, paired on {n} questions")
    for col in ("schedule", f"{a} [95%]", "rank", f"{b} [95%]", "rank"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["overrides"].items())
        (sa, sb), (ia, ib) = r["scores"], r["intervals"]
        table.add_row(label, format_interval(sa, ia), str(r["ranks"][0]), format_interval(sb, ib), str(r["ranks"][1]))
    out.print(table)
    out.print(
        f"Spearman {format_interval(result['spearman'], result['spearman_interval'])}, Kendall "
        f"{format_interval(result['kendall'], result['kendall_interval'])} (intervals over the questions, "
        f"not over the choice of schedules)",
        highlight=False,
    )
    lo, hi = result["regret_interval"]
    out.print(
        f"{a}'s pick {result['pick']['labels'][1]} scores {result['pick']['scores'][1]:.1f} in {b}; the best there, "
        f"{result['best']['labels'][1]}, {result['best']['scores'][1]:.1f}: regret {result['regret']:.1f} "
        f"[{lo:.1f}, {hi:.1f}]; the two picks coincide in {100 * result['same_pick_share']:.0f}% of resamples",
        highlight=False,
    )
    for note in result["notes"]:
        out.print(f"[dim]note: {note}[/]", highlight=False)


def _clean(uri: Optional[str]) -> Optional[str]:
    """A --tracking-uri without its credentials (moved into the environment, where MLflow reads them)."""
    from hidrop_platform.config.schema import credentials_to_env

    return credentials_to_env(uri) if uri else uri


def _report_source(experiment: str, tracking_uri: Optional[str]) -> tuple[str, str]:
    """(tracking URI, MLflow experiment name) from a name or an experiment YAML's tracking section."""
    from hidrop_platform.tracking.store import default_tracking_uri, tracking_target

    if experiment.endswith((".yaml", ".yml")):
        uri, name = tracking_target(_load(experiment))
        return _clean(tracking_uri) or uri, name
    return _clean(tracking_uri) or default_tracking_uri(), experiment


@app.command("report")
def report_command(
    experiment: str = typer.Argument(..., help="MLflow experiment name (e.g. demo), or an experiment YAML"),
    sweep: Optional[str] = typer.Option(None, help="which sweep (tune.name); default: the newest finished one"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="output folder (default: reports/<experiment>)"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="default: the local store ./mlruns/mlflow.db"
    ),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="attach the files to the sweep's parent run"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Dashboards from MLflow: Pareto plot, methods x benchmarks table, training-cost table, diagnostics."""
    from hidrop_dashboards.report import ReportError, build_report
    from hidrop_platform.storage import write_problem
    from hidrop_platform.tracking.store import TrackingUnavailable, check_readable

    uri, name = _report_source(experiment, tracking_uri)
    target = out_dir or f"reports/{name}"
    problem = write_problem(target)
    if problem is not None:
        _fail(f"--out {target}: {problem}")
    try:
        check_readable(uri)
        result = build_report(uri, name, target, sweep=sweep, publish=publish)
    except (ReportError, TrackingUnavailable) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(
        f"[bold green]report[/] {result['html']}  ({result['trials']} trials, {result['trainings']} training runs"
        f"{', diagnostics' if result['diagnostics'] else ''})"
    )
    out.print(f"  methods: {', '.join(result['methods']) or '-'}")
    if result["published_to_run"]:
        out.print(f"  also attached to the sweep's parent run {result['published_to_run']} (artifacts/report)")


@app.command("sync")
def sync_command(
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="replay into this store (default: the one each record was meant for)"
    ),
    spool_dir: Optional[str] = typer.Option(None, "--spool-dir", help="default: ./mlruns/spool"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Replay MLflow records that wait in ./mlruns/spool (their store was unreachable or full) into their runs."""
    from hidrop_platform.tracking.store import TrackingUnavailable, default_spool_dir, pending_spools, sync_spool

    if spool_dir and Path(spool_dir).exists() and not Path(spool_dir).is_dir():
        _fail(f"--spool-dir {spool_dir} is not a folder")
    rows = []
    for path in pending_spools(Path(spool_dir) if spool_dir else default_spool_dir()):
        try:
            rows.append({"file": str(path), "status": "synced", "run_id": sync_spool(path, _clean(tracking_uri))})
        except TrackingUnavailable as e:
            rows.append({"file": str(path), "status": "waiting", "error": str(e)})
        except Exception as e:  # noqa: BLE001 - the store rejected a record: say which file, keep it
            rows.append({"file": str(path), "status": "rejected", "error": " ".join(str(e).split())[:300]})
    left = [r for r in rows if r["status"] != "synced"]
    if as_json:
        print(json.dumps({"spools": rows, "left": len(left)}, indent=2))
    else:
        for r in rows:
            out.print(f"{r['status']:>8}  {r['file']}  {r.get('run_id') or r.get('error', '')}", highlight=False)
        out.print(f"{len(rows) - len(left)} of {len(rows)} spooled runs synced" if rows else "nothing to sync")
    if left:
        _fail(f"{len(left)} spooled runs are still waiting (first: {left[0]['error']})")


def _warn_spooled(since: float) -> None:
    """Records the workers or trials could not write (an unreachable or full store) wait in the spool:
    say so in the driver's own output, not only in Ray's worker logs."""
    from hidrop_platform.tracking.store import default_spool_dir, pending_spools

    waiting = pending_spools(default_spool_dir(), since)
    if waiting:
        err.print(
            f"[bold yellow]warning:[/] records of {len(waiting)} MLflow runs could not be written and wait in "
            f"{waiting[0].parent}; `hidrop sync` replays them once the store answers",
            highlight=False,
            soft_wrap=True,
        )


@app.command("ui")
def ui_command(
    port: int = typer.Option(5000, help="port to listen on (1-65535)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind; anything but loopback exposes your runs"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="default: the local store ./mlruns/mlflow.db"
    ),
):
    """Start the MLflow UI over the local store (127.0.0.1 by default); Ctrl+C stops it."""
    import signal

    if not 1 <= port <= 65535:
        _fail(f"--port must be between 1 and 65535, not {port}")

    from hidrop_platform.tracking.store import TrackingUnavailable, default_tracking_uri, redact_uri
    from hidrop_platform.tracking.ui import UI_TRAINING_VIEW, serve_ui, stop_ui, ui_base_url

    uri = _clean(tracking_uri) or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        _fail(f"{uri} is already an MLflow server: open it in a browser (hidrop ui serves local stores)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(
            f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can read and change your runs"
        )
    try:
        with out.status("starting the MLflow UI..."):
            process = serve_ui(uri, host=host, port=port)
    except TrackingUnavailable as e:
        _fail(str(e))
    url = f"{ui_base_url(host, port)}/#/experiments{UI_TRAINING_VIEW}"
    out.print(f"[bold green]MLflow UI[/] {url}  (store {redact_uri(uri)}); Ctrl+C to stop", highlight=False)
    out.print("  reports: the sweep's parent run > Artifacts > report/report.html, or the files under reports/")

    def stop(signum, frame):  # Ctrl+C or `kill`: stop the server and its workers, then exit cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(process)


@app.command("demo")
def demo_command(
    size: str = typer.Option(
        "default",
        help="small (~4 min on 2 cores), default (~9 min) or large (24 trials x 162 questions, 40 training steps)",
    ),
    trials: Optional[int] = typer.Option(None, help="searched trials after the 6 presets (overrides --size)"),
    samples: Optional[int] = typer.Option(None, help="easy-vqa questions per trial (overrides --size)"),
    train_steps: Optional[int] = typer.Option(None, help="steps per training run; 0 skips training (overrides --size)"),
    out_dir: str = typer.Option("reports/demo", "--out", help="where the report is written"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """The quickstart: presets + a small schedule search, two short trainings, and the report (all local)."""
    import dataclasses

    from hidrop_platform.demo import DEMO_MAX, SIZES, run_demo

    if size not in SIZES:
        _fail(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    chosen = SIZES[size]
    for option, name, value in (
        ("--trials", "searched", trials),
        ("--samples", "easy_vqa", samples),
        ("--train-steps", "train_steps", train_steps),
    ):
        if value is not None:
            least = 0 if name == "train_steps" else 1
            if value < least:
                _fail(f"{option} must be >= {least}, not {value}")
            if value > DEMO_MAX[name]:  # a typo of a few zeros would run for days
                _fail(f"{option} must be at most {DEMO_MAX[name]} (a local demo), not {value}")
            chosen = dataclasses.replace(chosen, **{name: value})
    from hidrop_dashboards.report import ReportError
    from hidrop_platform.storage import write_problem
    from hidrop_platform.train.driver import TrainSetupError
    from hidrop_platform.tune.driver import TuneSetupError

    # before minutes of search and training; runs/ and mlruns/ go into the working directory
    for what, folder in ((f"--out {out_dir}", out_dir), ("the working directory (runs/, mlruns/)", ".")):
        problem = write_problem(folder)
        if problem is not None:
            _fail(f"{what}: {problem}")
    try:
        if as_json:
            with _stdout_to_stderr():
                result = run_demo(chosen, out_dir)
            print(json.dumps(result, indent=2, default=str))
            return
        result = _demo_with_bars(chosen, out_dir)
    except (TuneSetupError, TrainSetupError, ReportError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("demo interrupted; what finished is in MLflow (hidrop ui) and ./runs/demo")
    _print_demo(result)


def _demo_with_bars(chosen, out_dir: str) -> dict:
    """run_demo with a stage line per step and one bar for the sweep's trials and the trainings' steps."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hidrop_platform.demo import DemoProgress, run_demo

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns, console=out) as bar:
        task = bar.add_task("starting", total=None, stats="")

        class Shown(DemoProgress):
            def stage(self, name: str, index: int, total: int, short: str = "") -> None:
                bar.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [{index}/{total}] {name}", highlight=False)
                bar.update(task, description=f"[{index}/{total}] {short or name}", completed=0, total=None, stats="")

            def sweep(self, label: str, done: int, total: int) -> None:
                if total:
                    bar.update(task, completed=done, total=total, stats=f"last: {label}")
                else:
                    bar.update(task, stats=label)

            def train(self, info: dict) -> None:
                bar.update(task, completed=info["step"], total=info["total"], stats=f"loss {info['loss']:.3f}")

        return run_demo(chosen, out_dir, progress=Shown())


def _print_demo(result: dict) -> None:
    rows = sorted((t for t in result["trials"] if t["relative_score"] is not None), key=lambda t: t["vision_tflops"])
    table = Table(title=f"hidrop demo: {len(rows)} schedules on the mini-LLaVA ({result['wall_time_s']:.0f} s)")
    for col in ("schedule", "front", "relative score [95% CI]", "questions", "avg vision tokens", "vision TFLOPs"):
        table.add_column(col, justify="left" if col == "schedule" else "right", no_wrap=col == "schedule")
    for t in rows:
        table.add_row(
            t["label"],
            front_mark(t),
            interval_text(t),
            f"{t.get('samples') or 0:.0f}" + (" (stopped)" if t.get("status") == N.STOPPED_EARLY else ""),
            f"{t['avg_vision_tokens']:.1f}",
            f"{t['vision_tflops']:.4g}",
        )
    out.print(table)
    blind = format_interval(result["blind_relative_score"], result.get("blind_relative_interval"))
    out.print(
        f"blind (no image): {blind}% relative: a schedule whose interval reaches into that band is 'blind level'. "
        "front: clear = with significance; yes = on the estimates only"
    )
    for n in result.get("notes", []):
        out.print(f"[yellow]note:[/] {n}")
    confirm = result.get("confirm") or {}
    if confirm.get("rows"):
        questions = ", ".join(f"{b} {n}" for b, n in confirm["benchmarks"].items())
        held = Table(title=f"Held-out confirmation: {questions} questions the search never saw")
        for col in CONFIRM_COLUMNS:
            held.add_column(col, justify="left" if col == "trial" else "right", no_wrap=col == "trial")
        for row in confirm_rows(confirm):
            held.add_row(*row)
        out.print(held)
        if confirm.get("optimism_gap") is not None:
            out.print(f"optimism gap of the searched winners (search - confirmed): {confirm['optimism_gap']:+.1f}")
    trained = result.get("trained")
    if trained:
        paired = Table(title="Trained with the schedule active, on the same questions (paired)")
        for col in ("model", "scores [95% CI]", "relative score [95% CI]"):
            paired.add_column(col, justify="left" if col == "model" else "right")
        for r in trained["rows"]:
            scores = ", ".join(f"{b} {format_interval(v, r['intervals'][b])}" for b, v in r["scores"].items())
            paired.add_row(r["label"], scores, format_interval(r["relative_score"], r["relative_interval"]))
        out.print(paired)
    for t in result["trainings"]:
        out.print(f"trained {t['method']}: {t['wall_time_s']:.0f} s, final loss {t['loss']:.3f}")
    out.print(f"[bold]Report:[/] {Path(result['report']['html']).resolve()}")
    out.print(
        f"[bold]Browse every run:[/] {_own_command()} ui   (from this folder; it prints the address, "
        "then open the experiment 'demo')",
        highlight=False,
    )


def _own_command() -> str:
    """How the user ran us (`.venv/bin/hidrop`, `hidrop`), so the printed next command works as typed."""
    import os
    import shutil

    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "hidrop":
        return "hidrop"
    if os.sep in argv0 and shutil.which("hidrop") != os.path.abspath(argv0):
        return os.path.relpath(argv0) if not os.path.relpath(argv0).startswith("..") else argv0
    return "hidrop"


_BENCH_ARGS = {
    "experiment": lambda: typer.Argument(..., help="experiment YAML (model shape, bench section)"),
    "overrides": lambda: typer.Argument(None, help="a.b=value overrides, e.g. bench.repeats=10"),
    "device": lambda: typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    "small": lambda: typer.Option(
        None, "--small/--full", help="bench.cpu_shape instead of model.shape (default: small on CPU)"
    ),
    "as_json": lambda: typer.Option(False, "--json", help="machine-readable output"),
}


def _run_method_bench(kind: str, experiment: str, overrides, device, small, as_json: bool) -> None:
    """prefill / generate / train: every method on one random-weight model, a table of ratios to vanilla."""
    from hidrop_platform.bench import overhead as bench

    run = {
        "prefill": bench.run_prefill_bench,
        "generate": bench.run_generate_bench,
        "train": bench.run_train_step_bench,
    }[kind]
    cfg = _load(experiment, overrides)
    if device not in (None, "cpu") and not device.startswith("cuda"):
        _fail(f"--device must be cpu or cuda, not {device!r}")
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device here")
    if as_json:
        print(json.dumps(run(cfg, device=device, small=small), indent=2))
        return
    with out.status(f"benchmarking {kind}...") as status:
        result = run(cfg, device=device, small=small, progress=lambda n: status.update(f"benchmarking {kind}: {n}"))
    m, seq = result["model"], result["sequence"]
    what = {
        "prefill": "Prefill",
        "generate": f"Generation of {result.get('new_tokens')} tokens",
        "train": "Training step",
    }[kind]
    table = Table(
        title=f"{what} on {result['device']} ({result['dtype']}, batch {result['batch_size']}, "
        f"{seq['vision_tokens']} vision + {seq['text_tokens']} text tokens, "
        f"{m['num_layers']} layers x {m['hidden_size']}, median of {result['repeats']})"
    )
    columns = {
        "prefill": [
            ("latency ms", "latency_ms", ".1f"),
            ("speed-up", "speedup_vs_vanilla", ".2fx"),
            ("FLOPs ratio", "flops_ratio_vs_vanilla", ".2fx"),
            ("scoring % of vanilla", "scoring_overhead_pct_of_vanilla", ".1f%"),
            ("TFLOPs/sample", "model_tflops_per_sample", ".4g"),
        ],
        "generate": [
            ("total ms", "latency_ms", ".1f"),
            ("speed-up", "speedup_vs_vanilla", ".2fx"),
            ("first token ms", "time_to_first_token_ms", ".1f"),
            ("decode ms/token", "decode_ms_per_token", ".2f"),
            ("decode speed-up", "decode_speedup_vs_vanilla", ".2fx"),
            ("tokens/s", "tokens_per_s", ".1f"),
            ("KV cache MiB", "kv_cache_mib", ".1f"),
        ],
        "train": [
            ("step ms", "latency_ms", ".1f"),
            ("speed-up", "speedup_vs_vanilla", ".2fx"),
            ("FLOPs ratio", "flops_ratio_vs_vanilla", ".2fx"),
            ("samples/s", "throughput_samples_s", ".2f"),
            ("train TFLOPs/sample", "train_tflops_per_sample", ".4g"),
        ],
    }[kind]
    if any(r.get("peak_memory_gib") is not None for r in result["methods"]):
        columns.append(("peak GiB", "peak_memory_gib", ".2f"))
    table.add_column("method")
    table.add_column("avg vis tokens", justify="right")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for r in result["methods"]:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            suffix = fmt[-1] if fmt[-1] in "x%" else ""
            cells.append("-" if value is None else f"{value:{fmt.rstrip('x%')}}{suffix}")
        table.add_row(r["name"], f"{r['avg_vision_tokens']:.1f}", *cells)
    out.print(table)


@bench_app.command("prefill")
def bench_prefill(
    experiment: str = _BENCH_ARGS["experiment"](),
    overrides: Optional[List[str]] = _BENCH_ARGS["overrides"](),
    device: Optional[str] = _BENCH_ARGS["device"](),
    small: Optional[bool] = _BENCH_ARGS["small"](),
    as_json: bool = _BENCH_ARGS["as_json"](),
):
    """Prefill latency of vanilla, FastV, PDrop and HiDrop on one random-weight model, with ratios."""
    _run_method_bench("prefill", experiment, overrides, device, small, as_json)


@bench_app.command("generate")
def bench_generate(
    experiment: str = _BENCH_ARGS["experiment"](),
    overrides: Optional[List[str]] = _BENCH_ARGS["overrides"](),
    device: Optional[str] = _BENCH_ARGS["device"](),
    small: Optional[bool] = _BENCH_ARGS["small"](),
    as_json: bool = _BENCH_ARGS["as_json"](),
):
    """Greedy generation (bench.new_tokens): first-token time, per-token decode, KV cache size, ratios."""
    _run_method_bench("generate", experiment, overrides, device, small, as_json)


@bench_app.command("train")
def bench_train(
    experiment: str = _BENCH_ARGS["experiment"](),
    overrides: Optional[List[str]] = _BENCH_ARGS["overrides"](),
    device: Optional[str] = _BENCH_ARGS["device"](),
    small: Optional[bool] = _BENCH_ARGS["small"](),
    as_json: bool = _BENCH_ARGS["as_json"](),
):
    """Training step (forward + backward, schedule active) per method on one random-weight model, with ratios."""
    _run_method_bench("train", experiment, overrides, device, small, as_json)


@bench_app.command("overhead")
def bench_overhead(
    experiment: str = typer.Argument(
        ..., help="experiment YAML with a train section (e.g. experiments/tiny_train_smoke.yaml)"
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides"),
    steps: int = typer.Option(40, help="timed optimizer steps per path (after warm-up)"),
    warmup: int = typer.Option(5, help="untimed warm-up steps"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Step time of Ray Train + DeepSpeed (one worker) against a plain single-process loop, the two taking
    turns step by step; prints the median per-step ratio."""
    from hidrop_platform.bench.overhead import OverheadBenchError, run_overhead_bench
    from hidrop_platform.train.driver import TrainSetupError

    cfg = _load(experiment, overrides)
    if steps < 1 or warmup < 0:
        _fail("--steps must be at least 1 and --warmup at least 0")
    try:
        with out.status("timing Ray Train + DeepSpeed and the plain loop, taking turns step by step..."):
            result = run_overhead_bench(cfg, steps=steps, warmup=warmup)
    except (TrainSetupError, OverheadBenchError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    zero = result["zero_optimization"]
    table = Table(
        title=f"Training step, {result['experiment']} (batch {result['micro_batch_size']} x accum "
        f"{result['grad_accum']}, ZeRO-{zero['stage']}, {result['threads']} thread(s), "
        f"median of {result['steps_timed']} alternating steps)"
    )
    for col in ("path", "step ms", "ratio"):
        table.add_column(col, justify="left" if col == "path" else "right")
    table.add_row("plain loop", f"{result['plain_step_s'] * 1000:.1f}", "1.00x")
    low, high = result["ratio_quartiles"]
    table.add_row(
        "Ray Train + DeepSpeed", f"{result['ray_deepspeed_step_s'] * 1000:.1f}", f"{result['overhead_ratio']:.2f}x"
    )
    out.print(table)
    out.print(
        f"overhead {result['overhead_ms']:+.1f} ms per step; per-step ratios, middle half: {low:.2f}x-{high:.2f}x; "
        f"goal: {result['goal']}"
    )
    first = result["first_loss"]
    out.print(f"first-step loss: plain {first['plain']:.5f}, Ray + DeepSpeed {first['ray_deepspeed']:.5f} (same work)")


@bench_app.command("search")
def bench_search(
    experiment: str = typer.Argument(..., help="experiment YAML with a training-free tune section"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. tune.fidelity.factor=2"),
    candidates: Optional[int] = typer.Option(
        None, help="random valid samples after the seeds (default: tune.num_samples)"
    ),
    budget: Optional[float] = typer.Option(None, help="vision-TFLOPs budget of the 'best' schedule (default: median)"),
    orders: int = typer.Option(
        1, min=1, help="also replay the rungs on N-1 reshuffled question orders (from the exhaustive records)"
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Exhaustive evaluation vs multi-fidelity search (tune.fidelity) on one fixed candidate set: questions,
    model passes and wall time of each, and what each finds, confirmed on held-out questions."""
    from hidrop_platform.bench.search import SearchBenchError, run_search_bench

    cfg, base = _load_with_data(experiment, overrides)
    if cfg.tune.kind != "training_free":
        _fail("bench search compares training-free searches; set tune.kind=training_free")
    try:
        with out.status("search benchmark...") as status:
            result = run_search_bench(cfg, base, candidates, budget, progress=lambda m: status.update(m), orders=orders)
    except SearchBenchError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    ex, mf = result["exhaustive"], result["multi_fidelity"]
    questions = ", ".join(f"{b} {n}" for b, n in result["search_questions"].items())
    table = Table(
        title=f"Search cost and quality: {result['candidates']} candidates on {questions} questions; "
        f"{result['rungs']} rungs x{result['factor']}, {result['promotion']} promotion"
    )
    columns = ("search", "questions", "passes", "wall s", "front", "best under budget", "confirmed [95% CI]", "HV")
    for col in (*columns, "HV above blind"):
        table.add_column(col, justify="left" if col in ("search", "best under budget") else "right")
    for name, side in (("exhaustive", ex), ("multi-fidelity", mf)):
        best = side["best_confirmed"]
        table.add_row(
            name,
            str(side["questions_run"]),
            str(side["batches_run"]),
            f"{side['wall_s']:.1f}",
            str(len(side["front"])),
            side["best_under_budget"] or "-",
            "-" if not best else format_interval(best[0], None if None in best[1:] else best[1:]),
            f"{side['hypervolume_confirmed']:.3g}",
            f"{side['hypervolume_confirmed_above_blind']:.3g}",
        )
    ratio = result["cost_ratio"]
    table.add_row(
        "ratio",
        f"{ratio['questions_run']:.2f}x",
        f"{ratio['batches_run']:.2f}x",
        f"{ratio['wall_s']:.2f}x",
        "",
        "",
        "",
        "",
        "",
    )
    out.print(table)
    held = ", ".join(f"{b} {n}" for b, n in result["confirm_questions"].items())
    out.print(
        f"budget {result['budget_vision_tflops']:.4g} vision TFLOPs; held-out questions {held} "
        f"(overlap with the search: {result['confirm_overlap']}); multi-fidelity stopped {mf['stopped']} of "
        f"{result['candidates']}; reference pass (shared, not counted): {result['reference']['questions_run']} "
        f"questions, {result['reference']['wall_s']:.1f} s"
    )
    out.print(result["verdict"])
    if "orders" in result:
        o = result["orders"]
        q, loss = o["questions_ratio"], o["loss_above_blind"]
        out.print(
            f"over {o['n']} rung orders: questions {q['mean']:.2f}x (range {q['min']:.2f}-{q['max']:.2f}); "
            f"confirmed front loss above blind {loss['mean']:+.1f} (range {loss['min']:+.1f} to {loss['max']:+.1f}), "
            f"significant in {o['significant_loss']} of {o['n']}, within exhaustive's interval in "
            f"{o['within_exhaustive_interval']} of {o['n']}"
        )
    for n in result["notes"]:
        out.print(f"[yellow]note:[/] {n}")


def main() -> None:  # pragma: no cover
    app(prog_name="hidrop")
