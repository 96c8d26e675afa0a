"""The score / cost trade-off of a set of schedules: which are on the Pareto front, and its plot."""

from __future__ import annotations

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


def plot_pareto(
    rows: Sequence[dict],
    path: str | Path,
    title: str,
    score_key: str = "relative_score",
    cost_key: str = "vision_tflops",
    reference_lines: Optional[dict[str, float]] = None,
) -> Path:
    """Scatter of every trial, the front as a step line, seed schedules (presets) labelled. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    searched = [r for r in rows if not r.get("seed")]
    seeds = [r for r in rows if r.get("seed")]
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
        )
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[cost_key])
    if front:
        ax.step(
            [r[cost_key] for r in front],
            [r[score_key] for r in front],
            where="post",
            c="#c23b22",
            lw=1.5,
            label="Pareto front",
        )
    for name, value in (reference_lines or {}).items():
        ax.axhline(value, ls="--", lw=0.8, c="grey")
        ax.annotate(name, (ax.get_xlim()[1], value), fontsize=7, ha="right", va="bottom", color="grey")
    ax.set_xlabel("vision TFLOPs per sample (paper formula)")
    ax.set_ylabel("relative score (% of all tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
