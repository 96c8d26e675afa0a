"""Multi-fidelity schedule search for training-free trials: evaluate in rungs of growing question counts
(`hidrop.evaluation.subsets.rung_select`: nested, so a question is scored once per trial) and promote
only the promising ones.

The objective is a front, not one number (ASHA on the relative score alone would stop every cheap
schedule), so trials are ranked by what they add to the front: first the non-dominated trials in the
order a greedy hypervolume selection takes them (each next one the trial that adds the most area above
blind's score at that rung, SMS-EMOA's criterion: a blind-level trial adds nothing, since answering
without the image costs no vision FLOPs), then the rest by non-dominated layer and NSGA-II's crowding
distance. Two promotion rules use that order:

- `halving`: at each rung below the last, the best 1/factor go on (successive halving);
- `interval`: at each rung below the last, a trial stops when it is behind the front beyond its noise
  (its upper bound is below the score of a trial at the same rung that costs no more), and at the last
  promotion at most 1/factor go on. Early rungs stop only the hopeless; the cut spends the dearest rung
  on the trials that add most to the front.

The same rules run asynchronously inside Ray Tune (`scheduler.ParetoHalving`, each trial against those that
reached the rung before it, as ASHA does) and synchronously in `hidrop bench search`
(`successive_halving`: each rung's trials against each other). Pure: no Ray, no MLflow, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence

from hidrop_platform.tune.pareto import pareto_front


@dataclass
class RungPoint:
    """One trial's evaluation at one rung."""

    score: float  # relative score
    cost: float  # vision TFLOPs
    low: Optional[float] = None
    high: Optional[float] = None
    blind: Optional[float] = None  # blind's relative score on the same questions: the front's floor
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


def pareto_order(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices by non-dominated layer, then crowding distance within the layer, then higher score, lower
    cost, index; undefined scores last."""
    if not points:
        return []
    layers = pareto_layers(points)
    spread: dict[int, float] = {}
    for depth in set(layers):
        spread.update(crowding(points, [i for i in range(len(points)) if layers[i] == depth]))
    # an undefined score (-inf: a reference at 0 on a small rung) ranks after every defined one
    return sorted(
        range(len(points)),
        key=lambda i: (not math.isfinite(points[i][0]), layers[i], -spread[i], -points[i][0], points[i][1], i),
    )


def front_order(
    points: Sequence[tuple[float, float]], floor: float = 0.0, ceiling: Optional[float] = None
) -> list[int]:
    """Indices by what each adds to the front: the non-dominated points in the order a greedy hypervolume
    selection takes them (area above `floor`, up to the reference cost `ceiling`: the unpruned model's,
    else a tenth beyond the dearest point), then every other point in `pareto_order`. Only
    non-dominated points can add area once their dominators are taken, and a point never adds more than
    one dominating it, so the greedy pass need only look at the front."""
    order = pareto_order(points)
    if not order:
        return []
    if ceiling is None:
        ceiling = 1.1 * max([p[1] for p in points if math.isfinite(p[1])] or [0.0]) or 1.0
    front = set(pareto_front(points))
    left = [i for i in order if i in front and points[i][0] > floor and points[i][1] < ceiling]
    taken: list[int] = []
    area = 0.0
    while left:
        gains = [hypervolume([points[k] for k in [*taken, i]], ceiling, floor) - area for i in left]
        best = max(range(len(left)), key=lambda k: gains[k])  # ties: the earlier in pareto_order
        if gains[best] <= 0:
            break
        taken.append(left.pop(best))
        area = hypervolume([points[k] for k in taken], ceiling, floor)  # recomputed: no drift on duplicates
    return taken + [i for i in order if i not in taken]


def floor_of(points: Sequence[RungPoint]) -> float:
    """The front's floor at one rung: blind's relative score on its questions (0 when unknown)."""
    blinds = [p.blind for p in points if p.blind is not None and math.isfinite(p.blind)]
    return sum(blinds) / len(blinds) if blinds else 0.0


def promoted(
    points: Sequence[tuple[float, float]], factor: float, floor: float = 0.0, ceiling: Optional[float] = None
) -> list[int]:
    """Indices of the points that go on to the next rung: the best ceil(n / factor) in `front_order`."""
    return sorted(front_order(points, floor, ceiling)[: math.ceil(len(points) / factor)])


def behind_front(point: RungPoint, rivals: Sequence[RungPoint]) -> bool:
    """Behind the front beyond its noise: a rival that costs no more scores above `point`'s upper bound
    (a point without an interval, e.g. the unpruned model, is never behind)."""
    if point.high is None or not math.isfinite(point.high):
        return False
    return any(r.cost <= point.cost and r.score > point.high for r in rivals)


def promote(
    points: Sequence[RungPoint],
    factor: int,
    rule: str = "halving",
    last: bool = False,
    ceiling: Optional[float] = None,
) -> list[int]:
    """Indices of the rung's points that go on: `rule` "halving" keeps the best ceil(n / factor) in
    `front_order`; "interval" keeps those not `behind_front`, capped at ceil(n / factor) when `last` (the
    promotion into the last rung). `ceiling`: the unpruned model's cost, the hypervolume's reference."""
    if rule not in ("halving", "interval"):
        raise ValueError(f"unknown promotion rule {rule!r}: halving or interval")
    pairs = [(p.score, p.cost) for p in points]
    floor = floor_of(points)
    if rule == "halving":
        return promoted(pairs, factor, floor, ceiling)
    alive = [i for i, p in enumerate(points) if not behind_front(p, [q for j, q in enumerate(points) if j != i])]
    cap = math.ceil(len(points) / factor)
    if not last or len(alive) <= cap:
        return alive
    ranked = front_order([pairs[i] for i in alive], floor, ceiling)
    return sorted(alive[k] for k in ranked[:cap])


def goes_on(
    point: RungPoint,
    rivals: Sequence[RungPoint],
    factor: int,
    rule: str = "halving",
    last: bool = False,
    ceiling: Optional[float] = None,
) -> bool:
    """Asynchronous form: does `point` go on among itself and the `rivals` already at its rung."""
    return len(rivals) in promote([*rivals, point], factor, rule, last, ceiling)


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
    rule: str = "halving",
    ceiling: Optional[float] = None,
) -> Search:
    """Synchronous successive halving over `labels`: every live candidate at rung r, then those `promote`
    keeps under `rule` go on, plus those in `always` (seeds, when they must run every rung).
    `evaluate(label, rung)` scores one candidate at one rung (reusing its earlier rungs' questions is
    the evaluator's job)."""
    search = Search(rungs=rungs, points={label: [] for label in labels})
    alive = list(labels)
    for rung in range(1, rungs + 1):
        for label in alive:
            search.points[label].append(evaluate(label, rung))
        if rung < rungs:
            points = [search.points[label][-1] for label in alive]
            keep = set(promote(points, factor, rule, last=rung == rungs - 1, ceiling=ceiling))
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
