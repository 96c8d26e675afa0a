"""The report's tables as plain rows, from `collect`'s data: Table 1 (methods x benchmarks), the held-out
confirmation, Table 2 (training cost), Table 10 (position encodings) and the comparison across
evaluations, each measured row with the paper's matching rows (`published`); and the cell texts the
Markdown and HTML pages share."""

from __future__ import annotations

import math
from typing import Any, Optional

from hidrop.cost import format_tflops
from hidrop.evaluation.paper import PAPER_BENCHMARKS, format_delta
from hidrop.evaluation.published import comparisons_for
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.evaluate.compare import columns
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.summary import TrialRecord, front_mark

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


def _method_name(label: str) -> str:
    name = label.removeprefix("seed:")
    return PRESET_NAMES.get(name, name)


def paper_order(benchmarks) -> list[str]:
    """The paper's Table 1 order first, then any other benchmark by name."""
    rank = {b: i for i, b in enumerate(PAPER_BENCHMARKS)}
    return sorted(benchmarks, key=lambda b: (rank.get(b, len(rank)), b))


def format_cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def relative_bounds(t: TrialRecord) -> Optional[list[float]]:
    lo, hi = t.relative_score_lo, t.relative_score_hi
    return None if lo is None or hi is None else [lo, hi]


def relative_text(row: dict) -> str:
    """Avg (%) with its paired 95% interval when the row has one."""
    if row.get("relative_score") is None:
        return "-"
    return format_interval(row["relative_score"], row.get("relative_interval"))


def scores_text(scores: dict, digits: int = 1, signed: bool = False) -> str:
    return ", ".join(f"{b} {format_delta(v, digits) if signed else format_cell(v, digits)}" for b, v in scores.items())


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
        (t for t in data["trials"] if t.seed and t.relative_score is not None),
        key=lambda t: (
            order.index(t.label.removeprefix("seed:")) if t.label.removeprefix("seed:") in order else len(order)
        ),
    )
    searched = sorted(  # discoveries only: a blind-level front point is no finding
        (t for t in data["trials"] if not t.seed and t.pareto and not t.blind_level),
        key=lambda t: -t.relative_score,
    )[:MAX_SEARCHED_ROWS]
    rows = []
    for kind, group in (("preset", presets), ("searched", searched)):
        for t in group:
            rows.append(
                {
                    "method": _method_name(t.label),
                    "kind": kind,
                    "pareto": bool(t.pareto),
                    "avg_vision_tokens": t.avg_vision_tokens,
                    "vision_tflops": t.vision_tflops,
                    "scores": {b: t.scores.get(b) for b in benches},
                    "relative_score": t.relative_score,
                    "relative_interval": relative_bounds(t),
                    "front": front_mark(t),
                    "plan": t.plan,
                    "published": _comparisons(t.to_dict(), sweep["reference_scores"], "table1"),
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
        c = getattr(t, "confirm", None) or {}  # the report's extra: the run's confirm/... metrics
        if N.RELATIVE_SCORE not in c:
            continue
        gap = t.relative_score - c[N.RELATIVE_SCORE] if t.relative_score is not None else None
        rows.append(
            {
                "label": t.label,
                "seed": t.seed,
                "vision_tflops": t.vision_tflops,
                "search": [t.relative_score, t.relative_score_lo, t.relative_score_hi],
                "confirmed": [c[N.RELATIVE_SCORE], c.get(N.RELATIVE_SCORE_LOW), c.get(N.RELATIVE_SCORE_HIGH)],
                "gap": gap,
                "samples": c.get(N.SAMPLES),
            }
        )
    rows.sort(key=lambda r: (not r["seed"], r["vision_tflops"] or 0.0))
    return {"rows": rows, "optimism_gap": (data.get("sweep") or {}).get("optimism_gap")}


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
        if getattr(t, "position_mode", None) and t.relative_score is not None and t.status in N.OUTCOME_STATUSES:
            groups.setdefault(("sweep", t.signature), []).append(
                {**t.to_dict(), "avg": t.relative_score, "reference": sweep["reference_scores"]}
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
        columns = paper_order({b for m in by_mode.values() for b in m["scores"]})
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
        ) + f", {first.get('method') or 'schedule'} at {format_cell(first.get('avg_vision_tokens'))} tokens"
        tables.append({"title": title, "kind": kind, "columns": columns, "rows": rows})
    return tables


def published_notes(rows: list[dict]) -> list[str]:
    notes: list[str] = []
    for r in rows:
        for c in r.get("published", []):
            notes += [n for n in c["notes"] if n not in notes]
    return notes


def training_published_cells(c: dict) -> tuple[list[str], list[str]]:
    """The published row and the differences under a training run, in the training table's columns."""
    hours = "-" if c["train_gpu_hours"] is None else f"{c['train_gpu_hours']:g} GPU-h (paper, full recipe)"
    tflops = "-" if c["infer_tflops"] is None else f"{c['infer_tflops']:g}"
    avg = f"{c['published_avg']:.1f}" + (
        f" (over {len(c['benchmarks'])})" if c["not_measured"] and c["benchmarks"] else ""
    )
    pub = [f"↳ {c['description']}", "", f"{c['tokens']:g}", hours, tflops, "", "", scores_text(c["published"]), avg]
    delta = [
        "↳ measured − paper",
        "",
        "",
        "",
        "",
        "",
        "",
        scores_text(c["deltas"], signed=True),
        format_delta(c["delta_avg"]),
    ]
    return pub, delta


def comparison_cells(comparison: dict, row: dict) -> list[str]:
    """label, avg tokens, vision TFLOPs, every score with its interval, relative score with its interval."""
    every = {**row["scores"], **row.get("families", {})}
    bounds = {**row["intervals"], **row.get("family_intervals", {})}
    return [
        row["label"],
        format_cell(row.get("avg_vision_tokens")),
        format_tflops(row.get("vision_tflops"), 4),
        *(format_interval(every[k], bounds[k]) for k in columns(comparison)),
        format_interval(row["relative_score"], row["relative_interval"]),
    ]


def comparison_head(comparison: dict) -> tuple[list[str], str]:
    """The comparison table's header and its question counts."""
    head = ["method", "avg tokens", "vision TFLOPs", *columns(comparison), f"% of {comparison['reference']} [95%]"]
    return head, ", ".join(f"{b}: {q}" for b, q in comparison["benchmarks"].items())
