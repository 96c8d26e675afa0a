"""The report as Markdown (report.md): the tables of `hidrop_dashboards.tables`, each measured row
followed by the paper's matching rows and the differences, then the notes."""

from __future__ import annotations

from typing import Optional

from hidrop.cost import format_tflops
from hidrop.evaluation.paper import comparison_rows
from hidrop_dashboards.tables import (
    comparison_cells,
    comparison_head,
    format_cell,
    published_notes,
    relative_text,
    scores_text,
    training_published_cells,
)
from hidrop_platform.evaluate.compare import pair_text
from hidrop_platform.tune.summary import CONFIRM_COLUMNS, confirm_rows


def comparison_markdown(comparison: dict) -> list[str]:
    """The comparison across evaluations: its table, then every pairwise difference."""
    head, n = comparison_head(comparison)
    lines = ["", f"Measured across evaluations, paired by question ({n} questions):", ""]
    lines += _head(head) + [_row(comparison_cells(comparison, r)) for r in comparison["rows"]]
    lines.append("")
    lines += [f"- {pair_text(p, '−')}" for p in comparison["pairs"]]
    return lines


def markdown_report(
    table: dict,
    trainings: list[dict],
    hours_label: str,
    positions: list[dict],
    confirm: Optional[dict] = None,
    comparison: Optional[dict] = None,
) -> str:
    """report.md: the comparison, Table 1, the held-out confirmation, Table 2, the Table 10 groups, notes."""
    lines = comparison_markdown(comparison) if comparison else []
    if table["rows"]:
        lines += _methods_lines(table)
    if confirm and confirm["rows"]:
        lines += _confirm_lines(confirm)
    if trainings:
        lines += _training_lines(trainings, hours_label)
    for group in positions:
        lines += _position_lines(group)
    notes = (
        published_notes(table["rows"])
        + published_notes(trainings)
        + published_notes([r for g in positions for r in g["rows"]])
    )
    if notes:
        lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: list[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def _methods_lines(table: dict) -> list[str]:
    """Table 1: a row per method (front members starred), each followed by its published rows."""
    lines = _head(["method", "avg tokens", *table["columns"], "Avg (%)"])
    for r in table["rows"]:
        lines.append(
            _row(
                [
                    r["method"] + (" *" if r["pareto"] else ""),
                    format_cell(r["avg_vision_tokens"]),
                    *(format_cell(r["scores"][b]) for b in table["columns"]),
                    relative_text(r),
                ]
            )
        )
        for c in r["published"]:
            lines += _published_lines(c, table["columns"], f"{c['tokens']:g}")
    return lines


def _confirm_lines(confirm: dict) -> list[str]:
    lines = ["", "Held-out confirmation (questions the search never saw):", ""]
    lines += _head(list(CONFIRM_COLUMNS)) + [_row(row) for row in confirm_rows(confirm)]
    if confirm["optimism_gap"] is not None:
        lines.append(f"\nOptimism gap of the searched winners: {confirm['optimism_gap']:+.1f} points.")
    return lines


def _training_lines(trainings: list[dict], hours_label: str) -> list[str]:
    """Table 2: a row per training run, each followed by its published rows."""
    lines = [
        "",
        f"| training run | stage | avg tokens | {hours_label} | samples/s | vision TFLOPs | model TFLOPs | loss | "
        "scores | Avg (% of all-tokens training) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trainings:
        lines.append(
            f"| {t['label']} | {t['stage']} | {format_cell(t['avg_vision_tokens'])} | "
            f"{format_cell(t['accelerator_hours'], 4)} | {format_cell(t['samples_per_s'], 2)} | "
            f"{format_tflops(t['vision_tflops'], 4)} | {format_tflops(t['model_tflops'], 4)} | "
            f"{format_cell(t['loss'], 3)} | {scores_text(t['scores'])} | {format_cell(t['vs_all_tokens_training'])} |"
        )
        for c in t["published"]:
            pub, delta = training_published_cells(c)
            pub.insert(4, "")  # samples/s: no published figure
            delta.insert(4, "")
            lines += [_row(pub), _row(delta)]
    return lines


def _position_lines(group: dict) -> list[str]:
    """One Table 10 group: a row per position encoding, each followed by its published rows."""
    lines = ["", f"Position encodings (Table 10 layout): {group['title']}", ""]
    lines += _head(["position encoding", "run", *group["columns"], "Avg (%)"])
    for r in group["rows"]:
        scores = (format_cell(r["scores"][b]) for b in group["columns"])
        lines.append(_row([r["position_mode"], r["run"], *scores, format_cell(r["avg"])]))
        for c in r["published"]:
            lines += _published_lines(c, group["columns"])
    return lines


def _published_lines(c: dict, columns: list[str], tokens: str = "") -> list[str]:
    """Under a measured row: the paper's matching row (`tokens`: its tokens cell, if the table has one)
    and the differences."""
    pub, delta = comparison_rows(c, columns)
    tokens_cell = f" {tokens} |" if tokens else " |"
    return [
        f"| ↳ {c['description']} |{tokens_cell} " + " | ".join(pub) + " |",
        "| ↳ measured − paper | | " + " | ".join(delta) + " |",
    ]
