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
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from hidrop.cost import format_tflops
from hidrop.errors import UserError
from hidrop.evaluation.paper import PAPER_BENCHMARKS, comparison_rows, format_delta
from hidrop.evaluation.published import PublishedError, comparisons_for, exact_preset, method_from_name, model_key
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.evaluate.compare import columns, pair_text
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
from hidrop_platform.tune.summary import CONFIRM_COLUMNS, TrialRecord, confirm_rows, front_mark, summarize_sweep

# the order and names of the paper's rows; anything else is a searched trial
PRESET_NAMES = {
    "vanilla": "LLaVA (all tokens)",
    "fastv": "FastV",
    "pdrop": "PDrop",
    "hidrop_tok48": "HiDrop Tok48",
    "hidrop_tok64": "HiDrop Tok64",
    "hidrop_tok80": "HiDrop Tok80",
}
MAX_SEARCHED_ROWS = 8  # searched trials in Table 1: the Pareto front, best first


class ReportError(UserError, RuntimeError):
    """A report that cannot be built (no such experiment, nothing logged yet): one line for the CLI."""


def _tag(run, key: str, default: str = "") -> str:
    return run.data.tags.get(key, default)


def _method_name(label: str) -> str:
    name = label.removeprefix("seed:")
    return PRESET_NAMES.get(name, name)


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


def _paper_order(benchmarks) -> list[str]:
    """The paper's Table 1 order first, then any other benchmark by name."""
    rank = {b: i for i, b in enumerate(PAPER_BENCHMARKS)}
    return sorted(benchmarks, key=lambda b: (rank.get(b, len(rank)), b))


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


def comparison_cells(comparison: dict, row: dict) -> list[str]:
    """label, avg tokens, vision TFLOPs, every score with its interval, relative score with its interval."""
    every = {**row["scores"], **row.get("families", {})}
    bounds = {**row["intervals"], **row.get("family_intervals", {})}
    return [
        row["label"],
        _fmt(row.get("avg_vision_tokens")),
        format_tflops(row.get("vision_tflops"), 4),
        *(format_interval(every[k], bounds[k]) for k in columns(comparison)),
        format_interval(row["relative_score"], row["relative_interval"]),
    ]


def _comparison_head(comparison: dict) -> tuple[list[str], str]:
    """The comparison table's header and its question counts."""
    head = ["method", "avg tokens", "vision TFLOPs", *columns(comparison), f"% of {comparison['reference']} [95%]"]
    return head, ", ".join(f"{b}: {q}" for b, q in comparison["benchmarks"].items())


def comparison_markdown(comparison: dict) -> list[str]:
    head, n = _comparison_head(comparison)
    lines = ["", f"Measured across evaluations, paired by question ({n} questions):", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(comparison_cells(comparison, r)) + " |" for r in comparison["rows"]]
    lines.append("")
    lines += [f"- {pair_text(p, '−')}" for p in comparison["pairs"]]
    return lines


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
    trials = [t.to_dict() for t in summary.trials]
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
        "benchmarks": _paper_order(reference),
        "published_model": parent_model,
        "wall_s": m.get(N.WALL_S),
        "accelerator_hours": m.get(N.ACCELERATOR_HOURS),
        "samples": max((int(t["samples"]) for t in trials if "samples" in t), default=None),
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


# ---- tables ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _comparisons(
    row: dict, reference: Optional[dict], layout: str, tokens_key: str = "avg_vision_tokens"
) -> list[dict]:
    found = comparisons_for(
        row.get("published_model"),
        row.get("method"),
        row.get(tokens_key),
        row["scores"],
        reference,
        layout=layout,
        training=row.get("published_training", "any"),
        position_mode=row.get("position_mode") if layout == "table10" else None,
        preset=row.get("preset"),
    )
    return [c.to_dict() for c in found]


def methods_table(data: dict) -> dict:
    """Table 1: methods x benchmarks. The presets in the paper's order, then the searched trials on the
    Pareto front (at most MAX_SEARCHED_ROWS, highest score first), then the blind baseline. A row whose
    model, method and budget match a published one carries it (`published`) with the differences."""
    sweep = data["sweep"]
    if not sweep:
        return {"columns": [], "rows": []}
    benches = sweep["benchmarks"]
    order = list(PRESET_NAMES)
    presets = sorted(
        (t for t in data["trials"] if t["seed"] and "relative_score" in t),
        key=lambda t: (
            order.index(t["label"].removeprefix("seed:")) if t["label"].removeprefix("seed:") in order else len(order)
        ),
    )
    searched = sorted(  # discoveries only: a blind-level front point is no finding
        (t for t in data["trials"] if not t["seed"] and t.get("pareto") and not t.get("blind_level")),
        key=lambda t: -t["relative_score"],
    )[:MAX_SEARCHED_ROWS]
    rows = []
    for kind, group in (("preset", presets), ("searched", searched)):
        for t in group:
            rows.append(
                {
                    "method": _method_name(t["label"]),
                    "kind": kind,
                    "pareto": bool(t.get("pareto")),
                    "avg_vision_tokens": t.get("avg_vision_tokens"),
                    "vision_tflops": t.get("vision_tflops"),
                    "scores": {b: t["scores"].get(b) for b in benches},
                    "relative_score": t["relative_score"],
                    "relative_interval": _bounds(t),
                    "front": front_mark(t),
                    "plan": t["plan"],
                    "published": _comparisons(t, sweep["reference_scores"], "table1"),
                }
            )
    if sweep["blind_relative_score"] is not None:
        rows.append(
            {
                "method": "blind (no image)",
                "kind": "baseline",
                "pareto": False,
                "avg_vision_tokens": 0.0,
                "vision_tflops": 0.0,
                "scores": {b: sweep["blind_scores"].get(b) for b in benches},
                "relative_score": sweep["blind_relative_score"],
                "relative_interval": sweep.get("blind_relative_interval"),
                "front": "",
                "plan": "",
                "published": [],
            }
        )
    return {"columns": benches, "rows": rows}


def confirm_table(data: dict) -> dict:
    """Held-out confirmation, as `hidrop tune` logged it into the trials' runs: search score vs confirmed
    score, both with their intervals, and the gap (search - confirmed); seeds first, then cheapest."""
    rows = []
    for t in data.get("trials") or []:
        c = t.get("confirm") or {}
        if N.RELATIVE_SCORE not in c:
            continue
        gap = t["relative_score"] - c[N.RELATIVE_SCORE] if t.get("relative_score") is not None else None
        rows.append(
            {
                "label": t["label"],
                "seed": t["seed"],
                "vision_tflops": t.get("vision_tflops"),
                "search": [t.get("relative_score"), t.get(N.RELATIVE_SCORE_LOW), t.get(N.RELATIVE_SCORE_HIGH)],
                "confirmed": [c[N.RELATIVE_SCORE], c.get(N.RELATIVE_SCORE_LOW), c.get(N.RELATIVE_SCORE_HIGH)],
                "gap": gap,
                "samples": c.get(N.SAMPLES),
            }
        )
    rows.sort(key=lambda r: (not r["seed"], r["vision_tflops"] or 0.0))
    return {"rows": rows, "optimism_gap": (data.get("sweep") or {}).get("optimism_gap")}


def _bounds(t: dict) -> Optional[list[float]]:
    lo, hi = t.get(N.RELATIVE_SCORE_LOW), t.get(N.RELATIVE_SCORE_HIGH)
    return None if lo is None or hi is None else [lo, hi]


def _relative_text(row: dict) -> str:
    """Avg (%) with its paired 95% interval when the row has one."""
    if row.get("relative_score") is None:
        return "-"
    return format_interval(row["relative_score"], row.get("relative_interval"))


def _all_tokens_training(trainings: list[dict]) -> Optional[dict]:
    """The newest all-tokens (vanilla) training with scores: the reference of trained models' Avg (%)."""
    return next(
        (t for t in trainings if (t.get("method") == "vanilla" or t["schedule"] == "vanilla") and t["scores"]), None
    )


def training_table(data: dict) -> list[dict]:
    """Table 2: what training cost, per run: tokens kept, accelerator-hours, TFLOPs per sample, outcome.

    `vs_all_tokens_training`: the paper's Avg (%) of each trained model against the newest all-tokens
    (vanilla) training with scores on the same benchmarks; `relative_score` is the run's own (its
    model pruned vs the same model unpruned). `published`: the paper's Table 2 row of the same model,
    method and budget, with the differences (scores against the all-tokens training)."""
    rows = [
        {
            k: t[k]
            for k in (
                "name",
                "run_id",
                "stage",
                "schedule",
                "avg_vision_tokens",
                "accelerator_hours",
                "device_type",
                "workers",
                "vision_tflops",
                "model_tflops",
                "loss",
                "relative_score",
                "scores",
                "samples_per_s",
                "status",
                "method",
                "position_mode",
                "signature",
                "published_model",
                "published_training",
                "preset",
            )
        }
        for t in data["trainings"]
    ]
    base = _all_tokens_training(rows)
    for t in rows:
        shared = [b for b in t["scores"] if base and b in base["scores"] and base["scores"][b] > 0]
        t["vs_all_tokens_training"] = (
            sum(100.0 * t["scores"][b] / base["scores"][b] for b in shared) / len(shared)
            if shared and len(shared) == len(base["scores"])
            else None
        )
        t["published"] = _comparisons(t, base["scores"] if base else None, "table2")
    names = [t["name"] for t in rows]
    for t in rows:  # the same YAML trained twice: tell the bars apart
        t["label"] = f"{t['name']} ({t['run_id'][:6]})" if names.count(t["name"]) > 1 else t["name"]
    return rows


def position_tables(data: dict, trainings: list[dict]) -> list[dict]:
    """Table 10: for every set of runs that differ only in `schedule.position_mode` (sweep trials of one
    sweep, or trainings), one table of position encodings x benchmarks with Avg (%) (a trial's relative
    score; a training's Avg against the all-tokens training), and the paper's Table 10 rows beneath."""
    groups: dict[tuple, list[dict]] = {}
    sweep = data["sweep"]
    for t in data["trials"]:
        if t.get("position_mode") and "relative_score" in t and t["status"] in N.OUTCOME_STATUSES:
            groups.setdefault(("sweep", t["signature"]), []).append(
                {**t, "avg": t["relative_score"], "reference": sweep["reference_scores"]}
            )
    base = _all_tokens_training(trainings)
    for t in trainings:
        if t.get("position_mode") and t["scores"]:
            groups.setdefault(("training", t["signature"]), []).append(
                {**t, "avg": t["vs_all_tokens_training"], "reference": base["scores"] if base else None}
            )
    tables = []
    for (kind, _), members in groups.items():
        by_mode: dict[str, dict] = {}
        for m in members:  # newest first: a mode run twice shows its newest run
            by_mode.setdefault(m["position_mode"], m)
        if len(by_mode) < 2:
            continue
        columns = _paper_order({b for m in by_mode.values() for b in m["scores"]})
        rows = [
            {
                "position_mode": mode,
                "run": m.get("label") or m.get("name"),
                "run_id": m["run_id"],
                "scores": {b: m["scores"].get(b) for b in columns},
                "avg": m["avg"],
                "published": _comparisons(m, m["reference"], "table10"),
            }
            for mode, m in sorted(by_mode.items())
        ]
        first = next(iter(by_mode.values()))
        title = (
            f"sweep {sweep['name']}" if kind == "sweep" else f"trainings ({first['stage']})"
        ) + f", {first.get('method') or 'schedule'} at {_fmt(first.get('avg_vision_tokens'))} tokens"
        tables.append({"title": title, "kind": kind, "columns": columns, "rows": rows})
    return tables


def _published_notes(rows: list[dict]) -> list[str]:
    notes: list[str] = []
    for r in rows:
        for c in r.get("published", []):
            notes += [n for n in c["notes"] if n not in notes]
    return notes


def _scores_text(scores: dict, digits: int = 1, signed: bool = False) -> str:
    return ", ".join(f"{b} {format_delta(v, digits) if signed else _fmt(v, digits)}" for b, v in scores.items())


def _markdown(
    table: dict,
    trainings: list[dict],
    hours_label: str,
    positions: list[dict],
    confirm: Optional[dict] = None,
    comparison: Optional[dict] = None,
) -> str:
    lines = comparison_markdown(comparison) if comparison else []
    if table["rows"]:
        head = ["method", "avg tokens", *table["columns"], "Avg (%)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in table["rows"]:
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["method"] + (" *" if r["pareto"] else ""),
                        _fmt(r["avg_vision_tokens"]),
                        *(_fmt(r["scores"][b]) for b in table["columns"]),
                        _relative_text(r),
                    ]
                )
                + " |"
            )
            for c in r["published"]:
                pub, delta = comparison_rows(c, table["columns"])
                lines.append(f"| ↳ {c['description']} | {c['tokens']:g} | " + " | ".join(pub) + " |")
                lines.append("| ↳ measured − paper | | " + " | ".join(delta) + " |")
    if confirm and confirm["rows"]:
        lines += ["", "Held-out confirmation (questions the search never saw):", ""]
        lines += ["| " + " | ".join(CONFIRM_COLUMNS) + " |", "|" + "---|" * len(CONFIRM_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in confirm_rows(confirm)]
        if confirm["optimism_gap"] is not None:
            lines.append(f"\nOptimism gap of the searched winners: {confirm['optimism_gap']:+.1f} points.")
    if trainings:
        lines += [
            "",
            f"| training run | stage | avg tokens | {hours_label} | samples/s | vision TFLOPs | model TFLOPs | loss | "
            "scores | Avg (% of all-tokens training) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in trainings:
            lines.append(
                f"| {t['label']} | {t['stage']} | {_fmt(t['avg_vision_tokens'])} | {_fmt(t['accelerator_hours'], 4)} | "
                f"{_fmt(t['samples_per_s'], 2)} | {format_tflops(t['vision_tflops'], 4)} | "
                f"{format_tflops(t['model_tflops'], 4)} | {_fmt(t['loss'], 3)} | "
                f"{_scores_text(t['scores'])} | {_fmt(t['vs_all_tokens_training'])} |"
            )
            for c in t["published"]:
                pub, delta = _training_published_cells(c)
                pub.insert(4, "")  # samples/s: no published figure
                delta.insert(4, "")
                lines.append("| " + " | ".join(pub) + " |")
                lines.append("| " + " | ".join(delta) + " |")
    for group in positions:
        head = ["position encoding", "run", *group["columns"], "Avg (%)"]
        lines += [
            "",
            f"Position encodings (Table 10 layout): {group['title']}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in group["rows"]:
            lines.append(
                "| "
                + " | ".join(
                    [r["position_mode"], r["run"], *(_fmt(r["scores"][b]) for b in group["columns"]), _fmt(r["avg"])]
                )
                + " |"
            )
            for c in r["published"]:
                pub, delta = comparison_rows(c, group["columns"])
                lines.append(f"| ↳ {c['description']} | | " + " | ".join(pub) + " |")
                lines.append("| ↳ measured − paper | | " + " | ".join(delta) + " |")
    notes = (
        _published_notes(table["rows"])
        + _published_notes(trainings)
        + _published_notes([r for g in positions for r in g["rows"]])
    )
    if notes:
        lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def _training_published_cells(c: dict) -> tuple[list[str], list[str]]:
    """The published row and the differences under a training run, in the training table's columns."""
    hours = "-" if c["train_gpu_hours"] is None else f"{c['train_gpu_hours']:g} GPU-h (paper, full recipe)"
    tflops = "-" if c["infer_tflops"] is None else f"{c['infer_tflops']:g}"
    avg = f"{c['published_avg']:.1f}" + (
        f" (over {len(c['benchmarks'])})" if c["not_measured"] and c["benchmarks"] else ""
    )
    pub = [f"↳ {c['description']}", "", f"{c['tokens']:g}", hours, tflops, "", "", _scores_text(c["published"]), avg]
    delta = [
        "↳ measured − paper",
        "",
        "",
        "",
        "",
        "",
        "",
        _scores_text(c["deltas"], signed=True),
        format_delta(c["delta_avg"]),
    ]
    return pub, delta


# ---- figures --------------------------------------------------------------------------------------------


def plot_training_cost(trainings: list[dict], path: Path, hours_label: str) -> Optional[Path]:
    rows = [t for t in trainings if t["accelerator_hours"] is not None]
    if not rows:
        return None
    import matplotlib

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


# ---- the page -------------------------------------------------------------------------------------------


def _img(path: Optional[Path], alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _html_table(head: list[str], rows: list[list[str]], row_classes: Optional[list[str]] = None) -> str:
    # in a scrolling box: a wide table (many benchmarks) would otherwise run off the page
    out = ['<div class="wide"><table><thead><tr>', *(f"<th>{html.escape(h)}</th>" for h in head)]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
.wide{max-width:100%;overflow-x:auto} td{overflow-wrap:anywhere}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left} tr.preset td{background:#fdf3e7} tr.baseline td{color:#777}
tr.front td:first-child{font-weight:600} img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}
tr.published td{color:#8a8a8a;font-style:italic;background:#fafafa}
tr.delta td{color:#6a6a6a;font-size:.85em;background:#fafafa}
"""


def _with_published(rows: list[list[str]], classes: list[str], measured: list[dict], cells) -> tuple[list, list]:
    """Interleave, under each measured row, its published rows and differences (`cells(c)` gives both)."""
    out_rows, out_classes = [], []
    for row, cls, m in zip(rows, classes, measured):
        out_rows.append(row)
        out_classes.append(cls)
        for c in m.get("published", []):
            pub, delta = cells(c)
            out_rows += [pub, delta]
            out_classes += ["published", "delta"]
    return out_rows, out_classes


def _notes_html(rows: list[dict]) -> str:
    notes = _published_notes(rows)
    return "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)


def render_html(
    data: dict,
    table: dict,
    trainings: list[dict],
    figures: dict[str, Optional[Path]],
    hours_label: str,
    positions: Optional[list[dict]] = None,
) -> str:
    """The report as one self-contained page: header, sweep (Pareto plot, Table 1, all trials), training
    cost (Table 2), position encodings (Table 10), diagnostics."""
    parts = _html_header(data)
    if data.get("comparison"):
        parts += _html_comparison(data["comparison"])
    if data["sweep"]:
        parts += _html_sweep(data, table, figures)
    parts += _html_training(trainings, figures, hours_label)
    for group in positions or []:
        parts += _html_positions(group)
    if figures.get("curves"):
        parts += _html_diagnostics(data, figures)
    parts.append("</body></html>\n")
    return "".join(parts)


def _html_header(data: dict) -> list[str]:
    sweep = data["sweep"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>hidrop report: {html.escape(data['experiment'])}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>hidrop report: {html.escape(data['experiment'])}</h1>",
        f"<p class='note'>MLflow store <code>{html.escape(data['tracking_uri'])}</code>",
    ]
    if sweep:
        parts.append(
            f"; sweep <code>{html.escape(sweep['name'])}</code> (parent run {sweep['run_id'][:8]}, "
            f"{len(data['trials'])} trials, status {sweep['status'].lower()}"
            + (
                f", {sweep['samples']} questions per trial over {len(sweep['benchmarks'])} benchmarks: "
                f"one answer moves a benchmark's score by {100 * len(sweep['benchmarks']) / sweep['samples']:.1f} "
                "points on average, so small differences are noise"
                if sweep["samples"]
                else ""
            )
            + ")"
        )
    parts.append(".</p>")
    return parts


def _html_comparison(comparison: dict) -> list[str]:
    head, n = _comparison_head(comparison)
    return [
        "<h2 id='comparison'>Methods across evaluations (Table 1 layout)</h2>",
        f"<p class='note'>Paired by question id ({html.escape(n)} questions); every score carries its 95% "
        f"bootstrap interval; relative score against {html.escape(comparison['reference'])}.</p>",
        _html_table(head, [comparison_cells(comparison, r) for r in comparison["rows"]]),
        "<ul>",
        *(f"<li>{html.escape(pair_text(p, '−'))}</li>" for p in comparison["pairs"]),
        "</ul>",
    ]


def _html_sweep(data: dict, table: dict, figures: dict[str, Optional[Path]]) -> list[str]:
    sweep, parts = data["sweep"], []
    parts.append("<h2 id='pareto'>Relative score vs vision TFLOPs</h2>" + _img(figures.get("pareto"), "Pareto plot"))
    parts.append(
        "<p class='note'>Relative score: the mean over benchmarks of score / all-tokens score x 100 (the paper's "
        "Avg %). Vision TFLOPs: the paper's formula per sample. Presets are labelled; the dashed lines are "
        "all tokens (100%) and the blind baseline (no image).</p>"
    )
    parts.append("<h2 id='methods'>Methods x benchmarks (Table 1 layout)</h2>")
    head = ["method", "avg vision tokens", *table["columns"], "Avg (%)"]
    rows = [
        [
            r["method"] + (f" (front: {r['front']})" if r["pareto"] and r["kind"] == "preset" else ""),
            _fmt(r["avg_vision_tokens"]),
            *(_fmt(r["scores"][b]) for b in table["columns"]),
            _relative_text(r),
        ]
        for r in table["rows"]
    ]
    classes = [r["kind"] + (" front" if r["pareto"] else "") for r in table["rows"]]

    def cells(c: dict) -> tuple[list[str], list[str]]:
        pub, delta = comparison_rows(c, table["columns"])
        return [c["description"], f"{c['tokens']:g}", *pub], ["measured − paper", "", *delta]

    parts.append(_html_table(head, *_with_published(rows, classes, table["rows"], cells)))
    parts.append(_notes_html(table["rows"]))
    parts.append(
        "<p class='note'>All-tokens scores: "
        f"{html.escape(json.dumps({b: round(v, 2) for b, v in sweep['reference_scores'].items()}))}. "
        f"Searched rows are the Pareto-front trials, best first (at most {MAX_SEARCHED_ROWS}).</p>"
    )
    trials_rows = [
        [
            t["label"],
            front_mark(t),
            _relative_text({**t, "relative_interval": _bounds(t)}),
            _fmt(t.get("avg_vision_tokens")),
            format_tflops(t.get("vision_tflops"), 4),
            t["status"],
            t["plan"],
        ]
        for t in data["trials"]
    ]
    confirm = confirm_table(data)
    if confirm["rows"]:
        parts.append(
            "<h2 id='confirm'>Held-out confirmation</h2>"
            + _html_table(CONFIRM_COLUMNS, confirm_rows(confirm))
            + "<p class='note'>The seeds and the best searched front trials, re-evaluated with all tokens and "
            "blind on questions the search never saw (checked by id). The gap (search - confirmed) is the "
            "winner's curse: a searched winner's search score is biased up by having been picked on it"
            + (
                f"; mean gap of the searched winners {confirm['optimism_gap']:+.1f} points"
                if confirm["optimism_gap"] is not None
                else ""
            )
            + ".</p>"
        )
    parts.append(
        "<h2 id='trials'>All trials</h2>"
        + _html_table(
            ["trial", "front", "Avg (%) [95% CI]", "avg tokens", "vision TFLOPs", "status", "per-layer plan"],
            trials_rows,
        )
        + "<p class='note'>front: <b>clear</b> = on the front with significance (no cheaper-or-equal trial's "
        "interval reaches its lower bound); <b>yes</b> = on the front of the point estimates only; "
        "<b>blind level</b> = not significantly above answering without the image (paired), never a discovery. "
        "Intervals are paired 95% bootstrap intervals against the sweep's all-tokens questions.</p>"
    )
    return parts


def _html_training(trainings: list[dict], figures: dict[str, Optional[Path]], hours_label: str) -> list[str]:
    parts = []
    parts.append("<h2 id='training'>Training cost (Table 2 layout)</h2>")
    if trainings:
        head = [
            "run",
            "stage",
            "avg vision tokens",
            hours_label,
            "vision TFLOPs / sample",
            "model TFLOPs / sample",
            "samples/s",
            "final loss",
            "scores",
            "Avg (% of all-tokens training)",
            "Avg (% of itself unpruned)",
        ]
        rows = [
            [
                t["label"],
                t["stage"],
                _fmt(t["avg_vision_tokens"]),
                _fmt(t["accelerator_hours"], 4),
                format_tflops(t["vision_tflops"], 4),
                format_tflops(t["model_tflops"], 4),
                _fmt(t["samples_per_s"], 2),
                _fmt(t["loss"], 3),
                _scores_text(t["scores"]),
                _fmt(t["vs_all_tokens_training"]),
                _fmt(t["relative_score"]),
            ]
            for t in trainings
        ]

        def training_cells(c: dict) -> tuple[list[str], list[str]]:
            pub, delta = _training_published_cells(c)  # the markdown columns, plus samples/s and "itself unpruned"
            return (
                [pub[0].removeprefix("↳ "), *pub[1:6], "", *pub[6:], ""],
                [delta[0].removeprefix("↳ "), *delta[1:6], "", *delta[6:], ""],
            )

        parts.append(
            _html_table(head, *_with_published(rows, [""] * len(rows), trainings, training_cells))
            + _notes_html(trainings)
            + _img(figures.get("training_cost"), "training cost")
        )
        parts.append(
            f"<p class='note'>{html.escape(hours_label)} = wall time x devices, measured in the run (not estimated). "
            "Scores need <code>train.eval_after: true</code>; Avg (% of all-tokens training) compares each trained "
            "model with the newest all-tokens training on the same benchmarks.</p>"
        )
    else:
        parts.append("<p class='note'>No training runs in this experiment (<code>hidrop train</code> logs them).</p>")
    return parts


def _html_positions(group: dict) -> list[str]:
    parts = []
    parts.append(f"<h2 id='positions'>Position encodings (Table 10 layout): {html.escape(group['title'])}</h2>")
    head = ["position encoding", "run", *group["columns"], "Avg (%)"]
    rows = [
        [r["position_mode"], r["run"], *(_fmt(r["scores"][b]) for b in group["columns"]), _fmt(r["avg"])]
        for r in group["rows"]
    ]

    def position_cells(c: dict, columns=group["columns"]) -> tuple[list[str], list[str]]:
        pub, delta = comparison_rows(c, columns)
        return [c["description"], "", *pub], ["measured − paper", "", *delta]

    parts.append(
        _html_table(head, *_with_published(rows, [""] * len(rows), group["rows"], position_cells))
        + _notes_html(group["rows"])
    )
    return parts


def _html_diagnostics(data: dict, figures: dict[str, Optional[Path]]) -> list[str]:
    parts = []
    proposed = data["analysis"]["proposed"]
    parts.append("<h2 id='diagnostics'>Layer diagnostics</h2>" + _img(figures["curves"], "diagnostics curves"))
    if proposed:
        parts.append(
            "<p class='note'>Proposed schedule: "
            + html.escape(", ".join(f"{k}={v}" for k, v in proposed.items()))
            + "</p>"
        )
    return parts


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
        scored = [t for t in data["trials"] if "relative_score" in t and "vision_tflops" in t]
        lines = {"all tokens": 100.0}
        if sweep_info["blind_relative_score"] is not None:
            lines["blind"] = sweep_info["blind_relative_score"]
        if scored:
            figures["pareto"] = plot_pareto(
                scored,
                out / "pareto.png",
                f"{experiment} / {sweep_info['name']}: relative score vs vision TFLOPs",
                reference_lines=lines,
                reference_bands=(
                    {"blind": sweep_info["blind_relative_interval"]}
                    if sweep_info.get("blind_relative_interval")
                    else None
                ),
            )
    trainings = training_table(data)
    positions = position_tables(data, trainings)
    figures["training_cost"] = plot_training_cost(trainings, out / "training_cost.png", hours_label)
    if data["analysis"]:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = download_artifact(tracking_uri, data["analysis"]["run_id"], N.ANALYSIS_CURVES, tmp)
                figures["curves"] = Path(shutil.copyfile(local, out / "curves.png"))
        except Exception:  # an analysis logged without its plot (tracking was offline): the report goes on
            figures["curves"] = None
    (out / "report.html").write_text(render_html(data, table, trainings, figures, hours_label, positions))
    confirm = confirm_table(data)
    (out / "report.md").write_text(_markdown(table, trainings, hours_label, positions, confirm, data["comparison"]))
    (out / "report.json").write_text(
        json.dumps(
            {
                **data,
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
