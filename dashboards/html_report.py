"""The report as one self-contained HTML page (report.html, the PNGs embedded): header, comparison
across evaluations, sweep (Pareto plot, Table 1, held-out confirmation, all trials), training cost
(Table 2), position encodings (Table 10), diagnostics."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional

from hidrop.cost import format_tflops
from hidrop.evaluation.paper import comparison_rows
from hidrop_dashboards.tables import (
    MAX_SEARCHED_ROWS,
    comparison_cells,
    comparison_head,
    confirm_table,
    format_cell,
    published_notes,
    relative_text,
    scores_text,
    training_published_cells,
)
from hidrop_platform.evaluate.compare import pair_text
from hidrop_platform.tune.summary import CONFIRM_COLUMNS, confirm_rows, table_rows

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
    notes = published_notes(rows)
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
    head, n = comparison_head(comparison)
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
            format_cell(r["avg_vision_tokens"]),
            *(format_cell(r["scores"][b]) for b in table["columns"]),
            relative_text(r),
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
            row.label,
            row.front,
            row.relative,
            format_cell(row.trial.avg_vision_tokens),
            format_tflops(row.trial.vision_tflops, 4),
            row.trial.status,
            row.trial.plan,
        ]
        for row in table_rows(data["trials"])
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
                format_cell(t["avg_vision_tokens"]),
                format_cell(t["accelerator_hours"], 4),
                format_tflops(t["vision_tflops"], 4),
                format_tflops(t["model_tflops"], 4),
                format_cell(t["samples_per_s"], 2),
                format_cell(t["loss"], 3),
                scores_text(t["scores"]),
                format_cell(t["vs_all_tokens_training"]),
                format_cell(t["relative_score"]),
            ]
            for t in trainings
        ]

        def training_cells(c: dict) -> tuple[list[str], list[str]]:
            pub, delta = training_published_cells(c)  # the markdown columns, plus samples/s and "itself unpruned"
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
        [r["position_mode"], r["run"], *(format_cell(r["scores"][b]) for b in group["columns"]), format_cell(r["avg"])]
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
