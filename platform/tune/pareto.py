"""The score / cost trade-off of a set of schedules: which are on the Pareto front, and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (score, cost) points no other point dominates (higher score is better, lower cost
    is better). A point is dominated by one at least as good on both and strictly better on one; equal
    points are all kept. Plain O(n^2): sweeps have hundreds of trials, not millions."""
    front = []
    for i, (score_i, cost_i) in enumerate(points):
        dominated = any(
            score_j >= score_i and cost_j <= cost_i and (score_j > score_i or cost_j < cost_i)
            for j, (score_j, cost_j) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def significant_front(
    points: Sequence[tuple[float, float]], intervals: Sequence[Optional[tuple[float, float]]]
) -> list[int]:
    """Indices of the points that are on the front with significance: no other point costs as much or
    less and has a score interval reaching this point's lower bound, i.e. no cheaper-or-equal point may
    be as good once the noise is counted; and on `pareto_front` (an interval need not contain its point
    estimate, so this is asked, not assumed). The test is interval overlap, which is conservative: two
    trials' paired difference would need both trials' question records. A point without an interval
    (or with a NaN bound) is never significant, and counts as its point score against the others."""

    def usable(iv) -> bool:
        return iv is not None and all(v is not None and math.isfinite(v) for v in iv)

    def bounds(i: int) -> tuple[float, float]:
        iv = intervals[i]
        return (float(iv[0]), float(iv[1])) if usable(iv) else (points[i][0], points[i][0])

    on_front = set(pareto_front(points))
    front = []
    for i, (_, cost_i) in enumerate(points):
        if not usable(intervals[i]) or i not in on_front:
            continue
        low_i = bounds(i)[0]
        rivals = any(points[j][1] <= cost_i and bounds(j)[1] >= low_i for j in range(len(points)) if j != i)
        if not rivals:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def plot_pareto(
    rows: Sequence[dict],
    path: str | Path,
    title: str,
    score_key: str = "relative_score",
    cost_key: str = "vision_tflops",
    reference_lines: Optional[dict[str, float]] = None,
    reference_bands: Optional[dict[str, Sequence[float]]] = None,
) -> Path:
    """Scatter of every trial with its 95% interval as an error bar, the front as a step line (clear
    points filled, blind-level ones crossed out), seed schedules (presets) labelled, and reference lines
    with their interval as a band (blind). Writes a PNG."""
    fig = pareto_figure(rows, title, score_key, cost_key, reference_lines, reference_bands)
    import matplotlib.pyplot as plt  # after pareto_figure picked the Agg backend

    path = Path(path)
    fig.savefig(path, bbox_inches="tight")  # the legend and line labels sit outside the axes
    plt.close(fig)
    return path


def pareto_figure(
    rows: Sequence[dict],
    title: str,
    score_key: str = "relative_score",
    cost_key: str = "vision_tflops",
    reference_lines: Optional[dict[str, float]] = None,
    reference_bands: Optional[dict[str, Sequence[float]]] = None,
):
    """The figure `plot_pareto` writes (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, band in (reference_bands or {}).items():
        ax.axhspan(band[0], band[1], color="grey", alpha=0.15, lw=0, label=f"{name} 95% CI")
    _draw_trials(ax, rows, score_key, cost_key)
    _draw_front(ax, rows, score_key, cost_key)
    _draw_reference_lines(ax, reference_lines or {})
    ax.set_xlabel("vision TFLOPs per sample (paper formula)")
    ax.set_ylabel("relative score (% of all tokens), 95% CI")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # below the axes: inside, it covered the low-score corner where the blind band and cheap trials are
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def _draw_trials(ax, rows: Sequence[dict], score_key: str, cost_key: str) -> None:
    """Every trial with its interval as an error bar; seeds (presets) as labelled diamonds."""

    def errorbars(group: Sequence[dict], **style) -> None:
        if not group:
            return
        x = [r[cost_key] for r in group]
        y = [r[score_key] for r in group]
        lo = [r.get(f"{score_key}_lo", r[score_key]) for r in group]
        hi = [r.get(f"{score_key}_hi", r[score_key]) for r in group]
        yerr = [[max(0.0, v - a) for v, a in zip(y, lo)], [max(0.0, b - v) for v, b in zip(y, hi)]]
        ax.errorbar(x, y, yerr=yerr, fmt="none", elinewidth=0.8, capsize=2, alpha=0.6, **style)

    searched = [r for r in rows if not r.get("seed")]
    seeds = [r for r in rows if r.get("seed")]
    errorbars(searched, ecolor="#8a9bb0")
    errorbars(seeds, ecolor="#d9822b")
    ax.scatter([r[cost_key] for r in searched], [r[score_key] for r in searched], s=22, c="#8a9bb0", label="searched")
    ax.scatter(
        [r[cost_key] for r in seeds], [r[score_key] for r in seeds], s=40, c="#d9822b", marker="D", label="presets"
    )
    for r in seeds:
        ax.annotate(
            r["label"].removeprefix("seed:"),
            (r[cost_key], r[score_key]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
            bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0),  # readable over the blind band
        )


def _draw_front(ax, rows: Sequence[dict], score_key: str, cost_key: str) -> None:
    """The front as a step line, its clear points circled and its blind-level ones crossed out."""
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[cost_key])
    if not front:
        return
    ax.step(
        [r[cost_key] for r in front],
        [r[score_key] for r in front],
        where="post",
        c="#c23b22",
        lw=1.5,
        label="Pareto front (estimates)",
    )
    marks = {
        "significant": dict(s=70, facecolors="none", edgecolors="#c23b22", lw=1.5, label="front with significance"),
        "blind_level": dict(s=60, c="black", marker="x", label="blind level (no discovery)"),
    }
    for flag, style in marks.items():
        marked = [r for r in front if r.get(flag)]
        if marked:
            ax.scatter([r[cost_key] for r in marked], [r[score_key] for r in marked], **style)


def _draw_reference_lines(ax, reference_lines: dict[str, Optional[float]]) -> None:
    """A dashed line per reference score (blind), named at the right edge."""
    for name, value in reference_lines.items():
        if value is None:
            continue
        ax.axhline(value, ls="--", lw=0.8, c="grey")
        # right of the axes: inside, the label sat on the points and the blind band
        ax.annotate(
            name,
            (1.0, value),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=7,
            ha="left",
            va="center",
            color="grey",
            annotation_clip=False,
        )
