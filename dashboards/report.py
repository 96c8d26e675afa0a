"""`hidrop report`: the dashboards of one MLflow experiment, read back from MLflow.

What it reads (everything the other commands log, nothing else):
- the latest (or a chosen) schedule sweep: the parent run `sweep:<name>` with the unpruned reference and
  blind scores, and its nested trial runs (relative score, per-benchmark scores, tokens, TFLOPs, hours);
- training runs (`hidrop train`): accelerator-hours, tokens kept, TFLOPs per sample, loss, and scores
  when the run evaluated its model (`train.eval_after`);
- the latest `hidrop analyze` run's curves;
- the latest `hidrop compare --track` run: methods of several evaluations (e.g. four trained models, each
  under its own schedule) paired by question, as Table 1 with intervals, per benchmark and family.

What it writes to `out_dir` and, as artifacts under `report/`, on the sweep's parent run:
`report.html` (one self-contained page: the PNGs are embedded), `pareto.png`, `training_cost.png`,
`curves.png` when an analysis exists, `report.json` with every number in the tables.

This module reads the runs and writes the files; the tables are built in `hidrop_dashboards.tables`, and
rendered by `hidrop_dashboards.markdown_report` (report.md) and `hidrop_dashboards.html_report`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from hidrop.errors import UserError
from hidrop.evaluation.published import PublishedError, exact_preset, method_from_name, model_key
from hidrop_dashboards.html_report import render_html
from hidrop_dashboards.markdown_report import markdown_report
from hidrop_dashboards.tables import confirm_table, methods_table, paper_order, position_tables, training_table
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    TrackingUnavailable,
    download_artifact,
    experiment_names,
    read_runs,
    redact_uri,
    upload_artifacts,
)
from hidrop_platform.tune.pareto import plot_pareto
from hidrop_platform.tune.summary import TrialRecord, summarize_sweep


class ReportError(UserError, RuntimeError):
    """A report that cannot be built (no such experiment, nothing logged yet): one line for the CLI."""


def _tag(run, key: str, default: str = "") -> str:
    return run.data.tags.get(key, default)


def _published_model(params: dict) -> Optional[str]:
    """The published model (hidrop/evaluation/published.yaml) a run's model is, from its params."""
    try:
        return model_key(params.get(N.MODEL_KIND), params.get(N.MODEL_PATH), params.get(N.EVAL_PUBLISHED, "auto"))
    except PublishedError:  # a model key this version's file does not know: show nothing rather than guess
        return None


def _run_method(params: dict, label: str) -> Optional[str]:
    """vanilla / fastv / pdrop / hidrop: logged as schedule.method; older runs by their preset's name."""
    if params.get(N.METHOD):
        return params[N.METHOD]
    for name in (params.get(N.RESOLVED_NAME), params.get(N.SCHEDULE_PRESET), label):
        if name and name != "None" and method_from_name(name):
            return method_from_name(name)
    return None


def _position_mode(params: dict) -> Optional[str]:
    mode = params.get(N.RESOLVED_POSITION_MODE) or params.get(N.SCHEDULE_POSITION_MODE)
    return None if mode in (None, "", "None") else mode


# params that name or describe a run rather than what it ran; position mode is what Table 10 varies
# (and model.path: each position mode's finetune starts from its own stage-1 export)
_NOT_IN_SIGNATURE = (N.NAME, N.DESCRIPTION, N.SCHEDULE_NAME, N.RESOLVED_NAME, N.MODEL_PATH)


def _signature(params: dict) -> str:
    """What a run ran, minus its position encoding: runs with equal signatures differ only in that."""
    kept = sorted(
        (k, v)
        for k, v in params.items()
        if k not in _NOT_IN_SIGNATURE and "position_mode" not in k and not k.startswith((N.VERSION, N.TRACKING_SECTION))
    )
    return hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:12]


def _published_fields(params: dict, label: str, fallback_model: Optional[str] = None) -> dict:
    name = next(
        (params[k] for k in (N.RESOLVED_NAME, N.SCHEDULE_PRESET) if params.get(k) not in (None, "None")),
        label.removeprefix("seed:"),
    )
    return {
        "method": _run_method(params, label),
        "position_mode": _position_mode(params),
        "preset": exact_preset(name, params.get(N.PLAN)),
        "signature": _signature(params),
        "published_model": _published_model(params) or fallback_model,
        "published_training": params.get(N.EVAL_PUBLISHED_TRAINING, "any"),
    }


def collect(tracking_uri: str, experiment: str, sweep: Optional[str] = None) -> dict:
    """Every number the report shows, as plain data (also written as report.json)."""
    try:
        runs = read_runs(tracking_uri, experiment)
        if runs is None:
            names = experiment_names(tracking_uri)
            raise ReportError(
                f"no MLflow experiment named {experiment!r} at {redact_uri(tracking_uri)}"
                + (f" (there are: {', '.join(names)})" if names else " (the store is empty)")
            )
    except TrackingUnavailable as e:
        raise ReportError(str(e)) from None
    sweeps = [r for r in runs if _tag(r, N.KIND) == N.KIND_SWEEP]
    if sweep is not None:
        sweeps = [r for r in sweeps if _tag(r, N.SWEEP) == sweep]
        if not sweeps:
            raise ReportError(f"experiment {experiment!r} has no sweep named {sweep!r}")
    finished = [r for r in sweeps if r.info.status == "FINISHED"]
    parent = (finished or sweeps or [None])[0]  # newest finished sweep, else the newest at all
    data: dict[str, Any] = {
        "experiment": experiment,
        "tracking_uri": redact_uri(tracking_uri),
        "sweep": None,
        "trials": [],
        "trainings": _trainings(runs),
        "analysis": None,
    }
    if parent is not None:
        data["sweep"] = _sweep(parent, [r for r in runs if _tag(r, N.PARENT_RUN) == parent.info.run_id])
        data["trials"] = data["sweep"].pop("trials")
    analyses = [r for r in runs if _tag(r, N.KIND) == N.KIND_ANALYZE and r.info.status == "FINISHED"]
    if analyses:
        data["analysis"] = {
            "run_id": analyses[0].info.run_id,
            "name": analyses[0].info.run_name,
            "proposed": N.strip_prefix(N.PROPOSED, analyses[0].data.params),
        }
    data["comparison"] = _comparison(tracking_uri, runs)
    if parent is None and not data["trainings"] and data["analysis"] is None and data["comparison"] is None:
        raise ReportError(f"experiment {experiment!r} has no sweep, training, analysis or comparison runs yet")
    return data


def _comparison(tracking_uri: str, runs: list) -> Optional[dict]:
    """The newest finished `hidrop compare --track` run's result (compare/compare.json), or None."""
    for run in runs:
        if _tag(run, N.KIND) == N.KIND_COMPARE and run.info.status == "FINISHED":
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    local = download_artifact(tracking_uri, run.info.run_id, N.COMPARE_ARTIFACT, tmp)
                    result = json.loads(Path(local).read_text())
            except Exception:  # logged while offline without its artifact: try an older one
                continue
            return {**result, "run_id": run.info.run_id}
    return None


def _sweep(parent, children: list) -> dict:
    m = parent.data.metrics
    reference = N.strip_prefix(N.REFERENCE, m)
    blind = N.strip_prefix(N.BLIND, m)
    records = []
    parent_model = _published_model(parent.data.params)
    for run in children:
        records.append(
            TrialRecord.from_metrics(
                run.info.run_name,
                _tag(run, N.STATUS, run.info.status.lower()),
                run.data.metrics,
                run_id=run.info.run_id,
                seed=_tag(run, N.SEED) == "True",
                **_published_fields(run.data.params, run.info.run_name, parent_model),
                plan=run.data.params.get(N.PLAN, ""),
                search=N.strip_prefix(N.SEARCH, run.data.params),
                confirm=N.strip_prefix(N.CONFIRM, run.data.metrics),
            )
        )
    # the rule `hidrop tune` uses: a failed or killed trial's last metrics are no outcome
    bounds = [m.get(N.BLIND_RELATIVE_LOW), m.get(N.BLIND_RELATIVE_HIGH)]
    rungs = parent.data.params.get(N.FIDELITY_RUNGS)
    summary = summarize_sweep(
        records,
        reference,
        blind,
        bounds if None not in bounds else None,
        m.get(N.BLIND_RELATIVE),
        int(rungs) if rungs not in (None, "None", "") else None,
    )
    trials = summary.trials
    return {
        "name": _tag(parent, N.SWEEP),
        "run_id": parent.info.run_id,
        "status": parent.info.status,
        "reference_scores": reference,
        "blind_scores": blind,
        "blind_relative_score": summary.blind_relative_score,
        "blind_relative_interval": summary.blind_relative_interval,
        "significant": summary.significant,
        "blind_level": summary.blind_level,
        "discoveries": summary.discoveries(),
        "optimism_gap": m.get(N.OPTIMISM_GAP),
        "benchmarks": paper_order(reference),
        "published_model": parent_model,
        "wall_s": m.get(N.WALL_S),
        "accelerator_hours": m.get(N.ACCELERATOR_HOURS),
        "samples": max((int(t.samples) for t in trials if t.samples is not None), default=None),
        "device_type": next((_tag(c, N.DEVICE_TYPE) for c in children if _tag(c, N.DEVICE_TYPE)), "cpu"),
        "trials": trials,
    }


def _trainings(runs: list) -> list[dict]:
    """`hidrop train` runs, newest first (older runs carry no hidrop.kind tag, but always a stage tag)."""
    rows = []
    for run in runs:
        if _tag(run, N.KIND) not in (N.KIND_TRAIN, "") or not _tag(run, N.STAGE) or _tag(run, N.PARENT_RUN):
            continue
        m, p = run.data.metrics, run.data.params
        rows.append(
            {
                "name": run.info.run_name,
                "run_id": run.info.run_id,
                "status": run.info.status,
                "stage": _tag(run, N.STAGE),
                **_published_fields(p, run.info.run_name),
                "device_type": _tag(run, N.DEVICE_TYPE, "cpu"),
                "workers": _tag(run, N.NUM_WORKERS, "1"),
                "schedule": p.get(N.SCHEDULE_PRESET) or p.get(N.SCHEDULE_NAME) or "",
                "avg_vision_tokens": m.get(N.AVG_VISION_TOKENS, m.get(N.VISION_TOKENS_KEPT)),
                "accelerator_hours": m.get(N.ACCELERATOR_HOURS),
                "vision_tflops": m.get(N.VISION_TFLOPS_PER_SAMPLE),
                "model_tflops": m.get(N.MODEL_TFLOPS_PER_SAMPLE),
                "loss": m.get(N.LOSS),
                "steps": p.get(N.TRAIN_MAX_STEPS),
                "samples_per_s": m.get(N.SAMPLES_PER_S),
                "relative_score": m.get(N.RELATIVE_SCORE),
                "scores": N.strip_prefix(N.SCORE, m),
            }
        )
    return rows


def plot_training_cost(trainings: list[dict], path: Path, hours_label: str) -> Optional[Path]:
    """Table 2 as bars: accelerator-hours and vision TFLOPs per training run; None without any hours."""
    rows = [t for t in trainings if t["accelerator_hours"] is not None]
    if not rows:
        return None
    import matplotlib  # only when a figure is drawn: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 0.5 * len(rows) + 1.8), dpi=120)
    names = [t["label"] for t in rows]
    axes[0].barh(names, [t["accelerator_hours"] for t in rows], color="#4a7ab5")
    axes[0].set_xlabel(hours_label)
    axes[1].barh(names, [t["vision_tflops"] or 0.0 for t in rows], color="#d9822b")
    axes[1].set_xlabel("vision TFLOPs per sample")
    axes[1].set_yticklabels([])
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("training cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(
    tracking_uri: str, experiment: str, out_dir: str | Path, sweep: Optional[str] = None, publish: bool = True
) -> dict:
    """Collect, draw, write; then attach the files to the sweep's parent run. Returns what was written."""
    data = collect(tracking_uri, experiment, sweep)
    out = Path(out_dir).resolve()  # absolute: the paths are printed and returned
    out.mkdir(parents=True, exist_ok=True)
    sweep_info = data["sweep"]
    gpu = any(t["device_type"] in ("cuda", "gpu") for t in data["trainings"])  # Table 2 is about the trainings
    hours_label = "GPU-hours" if gpu else "CPU-hours"
    figures: dict[str, Optional[Path]] = {}
    table = methods_table(data)
    if sweep_info:
        figures["pareto"] = _pareto_figure(data, experiment, out / "pareto.png")
    trainings = training_table(data)
    positions = position_tables(data, trainings)
    figures["training_cost"] = plot_training_cost(trainings, out / "training_cost.png", hours_label)
    if data["analysis"]:
        figures["curves"] = _curves_figure(tracking_uri, data["analysis"]["run_id"], out / "curves.png")
    (out / "report.html").write_text(render_html(data, table, trainings, figures, hours_label, positions))
    confirm = confirm_table(data)
    (out / "report.md").write_text(
        markdown_report(table, trainings, hours_label, positions, confirm, data["comparison"])
    )
    (out / "report.json").write_text(
        json.dumps(
            {
                **data,
                "trials": [t.to_dict() for t in data["trials"]],
                "methods_table": table,
                "training_table": trainings,
                "position_tables": positions,
                "confirm_table": confirm,
            },
            indent=2,
            default=str,
        )
    )
    # only what this call wrote (an earlier report in the same folder may have had more figures)
    written = sorted([out / "report.html", out / "report.md", out / "report.json", *(p for p in figures.values() if p)])
    published_to = None
    if publish and sweep_info:
        upload_artifacts(tracking_uri, sweep_info["run_id"], written, N.REPORT_DIR)
        published_to = sweep_info["run_id"]
    return {
        "experiment": experiment,
        "out_dir": str(out),
        "html": str(out / "report.html"),
        "files": [str(p) for p in written],
        "published_to_run": published_to,
        "methods": [r["method"] for r in table["rows"]],
        "trials": len(data["trials"]),
        "trainings": len(trainings),
        "position_tables": len(positions),
        "comparison": bool(data["comparison"]),
        "diagnostics": bool(figures.get("curves")),
        "published_rows": sum(
            len(r["published"]) for r in [*table["rows"], *trainings, *(r for g in positions for r in g["rows"])]
        ),
    }


def _pareto_figure(data: dict, experiment: str, path: Path) -> Optional[Path]:
    """The sweep's trials as relative score vs vision TFLOPs, with the all-tokens and blind lines; None
    (nothing drawn) when no trial has both."""
    sweep_info = data["sweep"]
    scored = [t.to_dict() for t in data["trials"] if t.relative_score is not None and t.vision_tflops is not None]
    if not scored:
        return None
    lines = {"all tokens": 100.0}
    if sweep_info["blind_relative_score"] is not None:
        lines["blind"] = sweep_info["blind_relative_score"]
    return plot_pareto(
        scored,
        path,
        f"{experiment} / {sweep_info['name']}: relative score vs vision TFLOPs",
        reference_lines=lines,
        reference_bands=(
            {"blind": sweep_info["blind_relative_interval"]} if sweep_info.get("blind_relative_interval") else None
        ),
    )


def _curves_figure(tracking_uri: str, run_id: str, path: Path) -> Optional[Path]:
    """The analysis run's curves plot, copied to `path`; None when the run has none."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = download_artifact(tracking_uri, run_id, N.ANALYSIS_CURVES, tmp)
            return Path(shutil.copyfile(local, path))
    except Exception:  # an analysis logged without its plot (tracking was offline): the report goes on
        return None
