"""What the `hidrop` commands print: the two consoles, the error line, warnings, the `--json` document,
and the results of validate, flops, eval, train, analyze, compare, report, sync and ui, one `print_*`
function per command. The tables of tune, proxy and demo are in search_views.py, those of bench in
bench_views.py; they print on this module's `out` too."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Optional

import yaml
from rich.console import Console
from rich.table import Table

from hidrop.cost import format_tflops
from hidrop.evaluation.paper import PAPER_BENCHMARKS, paper_table
from hidrop.evaluation.results import EvalReport
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.evaluate.compare import columns, pair_text
from hidrop_platform.tracking.spool import pending_spools
from hidrop_platform.tracking.store import default_spool_dir

# piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


# ---- plumbing shared by every command -------------------------------------------------------------


def print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def print_json(document: Any, default: Optional[Callable[[Any], Any]] = None) -> None:
    """--json: the document alone on stdout (`default=str` where it may hold paths or timestamps)."""
    print(json.dumps(document, indent=2, default=default))


@contextlib.contextmanager
def stdout_to_stderr():
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


def quiet_if(as_json: bool):
    """stdout_to_stderr() under --json, nothing otherwise."""
    return stdout_to_stderr() if as_json else contextlib.nullcontext()


def warn_spooled(since: float) -> None:
    """Records the workers or trials could not write (an unreachable or full store) wait in the spool:
    say so in the driver's own output, not only in Ray's worker logs."""
    waiting = pending_spools(default_spool_dir(), since)
    if waiting:
        err.print(
            f"[bold yellow]warning:[/] records of {len(waiting)} MLflow runs could not be written and wait in "
            f"{waiting[0].parent}; `hidrop sync` replays them once the store answers",
            highlight=False,
            soft_wrap=True,
        )


def say_stage_skipped(name: str, as_json: bool) -> None:
    """A two-stage recipe's earlier stage that already ran to its end with the same config."""
    if not as_json:
        err.print(f"{name}: already trained to its end with this config, skipped", highlight=False)


def print_interrupted(reason: BaseException) -> None:
    err.print(f"[bold yellow]interrupted:[/] {reason}", highlight=False, soft_wrap=True)


def _with_interval(value: Optional[float], interval: Optional[list[float]]) -> str:
    return "-" if value is None else format_interval(value, interval)


# ---- validate, flops ------------------------------------------------------------------------------


def print_validation(experiment: str, cfg, reports: list[dict]) -> None:
    """`hidrop validate`: the resolved config as YAML, then each schedule's plan and cost."""
    shape = cfg.model.shape
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


def print_costs(rows: list[dict]) -> None:
    """`hidrop flops`: one row per experiment and schedule."""
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


# ---- eval, train, analyze, compare ----------------------------------------------------------------


def print_eval(report: EvalReport) -> None:
    """`hidrop eval`: methods x benchmarks with intervals, per family, and the paper's Table 1 layout."""
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
    _print_families(report)
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


def _print_families(report: EvalReport) -> None:
    """Scores per question family (benchmark/family), where the benchmarks report them."""
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


def print_records_written(count: int, path: str) -> None:
    out.print(f"{count} question records written to {path}")


def print_training(name: str, result: dict) -> None:
    """`hidrop train`: final loss and where the checkpoint, the exported model and the runs are."""
    out.print(
        f"[bold green]done[/] {name} in {result['wall_time_s']:.0f} s: "
        f"loss {result['metrics'].get('loss', float('nan')):.4f} "
        f"at step {result['metrics'].get('step')}"
    )
    if result.get("continued"):
        out.print(f"  {result['continued']}")
    out.print(f"  checkpoint (DeepSpeed state): {result['checkpoint']}")
    out.print(f"  exported model (safetensors + schedule): {result['export']}")
    out.print(f"  MLflow: {result['tracking_uri']}")


def print_analysis(result: dict) -> None:
    """`hidrop analyze`: per-layer diagnostics with the sweeps' paired differences, and the proposal."""
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
    _print_proposal(result)


def _print_proposal(result: dict) -> None:
    """Below the layer table: the sweeps' all-tokens and blind levels, warnings and the proposed schedule."""
    sw, p = result["sweeps"], result["proposal"]
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


def print_comparison(result: dict, reference: str, baseline: Optional[str], track: Optional[str]) -> None:
    """`hidrop compare`: scores per label, the pairwise differences, the differences to --baseline, and the
    MLflow run it was logged to."""
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


# ---- report, sync, ui -----------------------------------------------------------------------------


def print_report(result: dict) -> None:
    """`hidrop report`: where the HTML report is and what it covers."""
    out.print(
        f"[bold green]report[/] {result['html']}  ({result['trials']} trials, {result['trainings']} training runs"
        f"{', diagnostics' if result['diagnostics'] else ''})"
    )
    out.print(f"  methods: {', '.join(result['methods']) or '-'}")
    if result["published_to_run"]:
        out.print(f"  also attached to the sweep's parent run {result['published_to_run']} (artifacts/report)")


def print_sync(rows: list[dict], left: list[dict]) -> None:
    """`hidrop sync`: one line per spool file, then how many were replayed."""
    for r in rows:
        out.print(f"{r['status']:>8}  {r['file']}  {r.get('run_id') or r.get('error', '')}", highlight=False)
    out.print(f"{len(rows) - len(left)} of {len(rows)} spooled runs synced" if rows else "nothing to sync")


def warn_exposed(host: str) -> None:
    err.print(f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can read and change your runs")


def print_ui_started(url: str, store: str) -> None:
    out.print(f"[bold green]MLflow UI[/] {url}  (store {store}); Ctrl+C to stop", highlight=False)
    out.print("  reports: the sweep's parent run > Artifacts > report/report.html, or the files under reports/")
