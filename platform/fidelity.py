"""Multi-fidelity schedule search for training-free trials: evaluate in rungs of growing question counts
(`hidrop.evaluation.subsets.rung_select`: nested, so a question is scored once per trial) and promote
only the promising ones.

The promotion rule is successive halving on the Pareto order, since the objective is a front, not one
number (ASHA on the relative score alone would stop every cheap schedule): at rung r, a trial goes on
when it ranks in the best 1/factor of the trials seen at that rung, ordered by non-dominated layer
(relative score up, vision TFLOPs down), then by NSGA-II's crowding distance within the layer, so the
survivors keep the front's spread from cheap to accurate. The same rule runs asynchronously inside Ray Tune
(`tune.ParetoHalving`, each trial against those that reached the rung before it, as ASHA does) and
synchronously in `hidrop bench search` (`successive_halving`: each rung's trials against each other).
Pure: no Ray, no MLflow, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence

from hidrop_platform.pareto import pareto_front


@dataclass
class RungPoint:
    """One trial's evaluation at one rung."""

    score: float  # relative score
    cost: float  # vision TFLOPs
    low: Optional[float] = None
    high: Optional[float] = None
    questions_run: int = 0  # (method, question) pairs this rung scored
    batches_run: int = 0
    wall_s: float = 0.0


def pareto_layers(points: Sequence[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting: each (score, cost) point's layer, 0 for the front, 1 for the front of the
    rest, ... (score up, cost down)."""
    layer = [-1] * len(points)
    left = list(range(len(points)))
    depth = 0
    while left:
        front = pareto_front([points[i] for i in left])
        for k in front:
            layer[left[k]] = depth
        taken = {left[k] for k in front}
        left = [i for i in left if i not in taken]
        depth += 1
    return layer


def crowding(points: Sequence[tuple[float, float]], members: Sequence[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each member of one layer: the normalised side lengths of the box
    its two neighbours span, per objective; the two ends of the layer get infinity, so a cut keeps the
    layer's spread (its cheapest and its best point first) rather than only its highest scores."""
    distance = {i: 0.0 for i in members}
    for axis in (0, 1):
        ranked = sorted(members, key=lambda i: (points[i][axis], i))
        span = points[ranked[-1]][axis] - points[ranked[0]][axis]
        distance[ranked[0]] = distance[ranked[-1]] = math.inf
        if span <= 0 or not math.isfinite(span):
            continue
        for before, i, after in zip(ranked, ranked[1:], ranked[2:]):
            distance[i] += (points[after][axis] - points[before][axis]) / span
    return distance


def promoted(points: Sequence[tuple[float, float]], factor: int) -> list[int]:
    """Indices of the points that go on to the next rung: the best ceil(n / factor) in the Pareto order
    (layer, then crowding distance within the layer, then higher score, lower cost, index)."""
    if not points:
        return []
    layers = pareto_layers(points)
    spread: dict[int, float] = {}
    for depth in set(layers):
        spread.update(crowding(points, [i for i in range(len(points)) if layers[i] == depth]))
    order = sorted(range(len(points)), key=lambda i: (layers[i], -spread[i], -points[i][0], points[i][1], i))
    return sorted(order[: math.ceil(len(points) / factor)])


def goes_on(point: tuple[float, float], rivals: Sequence[tuple[float, float]], factor: int) -> bool:
    """Asynchronous form: does `point` make the cut among itself and the `rivals` already at its rung."""
    return len(rivals) in promoted([*rivals, point], factor)


@dataclass
class Search:
    """What a multi-fidelity search did: every candidate's points by rung, and what it cost."""

    rungs: int
    points: dict[str, list[RungPoint]] = field(default_factory=dict)  # label -> its rungs, in order

    def final(self) -> dict[str, RungPoint]:
        return {label: pts[-1] for label, pts in self.points.items() if pts}

    def completed(self) -> list[str]:
        return [label for label, pts in self.points.items() if len(pts) == self.rungs]

    def every_point(self) -> list[RungPoint]:
        """Every rung of every candidate: what the search paid for."""
        return [p for pts in self.points.values() for p in pts]


def successive_halving(
    labels: Sequence[str],
    evaluate: Callable[[str, int], RungPoint],
    rungs: int,
    factor: int,
    always: Collection[str] = (),
) -> Search:
    """Synchronous successive halving over `labels`: every live candidate at rung r, then the best
    1/factor (`promoted`) go on, plus those in `always` (seeds, when they must run every rung).
    `evaluate(label, rung)` scores one candidate at one rung (reusing its earlier rungs' questions is
    the evaluator's job)."""
    search = Search(rungs=rungs, points={label: [] for label in labels})
    alive = list(labels)
    for rung in range(1, rungs + 1):
        for label in alive:
            search.points[label].append(evaluate(label, rung))
        if rung < rungs:
            points = [(search.points[label][-1].score, search.points[label][-1].cost) for label in alive]
            keep = set(promoted(points, factor))
            alive = [label for i, label in enumerate(alive) if i in keep or label in always]
    return search


def hypervolume(points: Sequence[tuple[float, float]], max_cost: float, min_score: float = 0.0) -> float:
    """Area (score x cost units) dominated by the points within the box [0, max_cost] x [min_score, inf):
    the standard 2-D hypervolume for score up, cost down, reference point (min_score, max_cost)."""
    front = sorted({(s, c) for s, c in points if c <= max_cost and s > min_score}, key=lambda p: (p[1], -p[0]))
    area, best = 0.0, min_score
    # sweep from the cheapest: each point adds the strip from its cost to max_cost above the best so far
    for score, cost in front:
        if score > best:
            area += (score - best) * (max_cost - cost)
            best = score
    return area
