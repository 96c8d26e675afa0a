"""`hidrop bench search`: what multi-fidelity search saves, measured against exhaustive evaluation on
one fixed candidate set in one run, and what it loses, measured on held-out questions.

Both searches see the same candidates (the seeds, then `candidates` valid random samples of
`tune.space`), the same model and the same questions, and pair with one reference pass (all tokens
and blind on every question, counted apart: a sweep pays it once either way). Exhaustive scores every
candidate on every question; multi-fidelity runs `tune.fidelity`'s rungs and promotion rule
(hidrop_platform.tune.rungs). Cost: (method, question) pairs scored, method x batch passes, wall time.
Quality: both fronts and both best-under-budget schedules are re-evaluated on questions neither search
saw (`tune.confirm`'s benchmarks), and compared there: the confirmed score of the best schedule under
the budget, with its interval, and the hypervolume of each front's confirmed points (relative score x
share of the dearest candidate's vision TFLOPs saved), above 0 and above blind's confirmed score (a
blind-level point adds nothing there), each with a paired interval on the difference. `orders` > 1
replays the rungs on reshuffled question orders from the exhaustive records. In-process and
sequential (no Ray), so the two wall times compare like for like.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np

from hidrop.errors import UserError
from hidrop.evaluation.harness import REFERENCE, EvalError, at_grid, known_records
from hidrop.evaluation.subsets import rung_select, unseen_select
from hidrop.evaluation.uncertainty import (
    bootstrap_p,
    compare_methods,
    format_p,
    percentile_interval,
    resampled_relative,
)
from hidrop_platform.config.schema import ConfirmConfig, ExperimentConfig, FidelityConfig
from hidrop_platform.evaluate.runs import (
    EvalSetupError,
    benchmarks_for,
    blind_score,
    build_model,
    evaluate_schedule,
    held_out_pass,
    known_for,
    reference_pass,
    seen_overlap,
)
from hidrop_platform.tune.confirm import confirm_benchmarks
from hidrop_platform.tune.errors import TuneSetupError
from hidrop_platform.tune.pareto import pareto_front
from hidrop_platform.tune.rungs import RungPoint, Search, hypervolume, successive_halving
from hidrop_platform.tune.searcher import ScheduleSearcher
from hidrop_platform.tune.space import trial_config


class SearchBenchError(UserError, RuntimeError):
    """A search benchmark that cannot run as configured (one line for the CLI)."""


def candidate_set(cfg: ExperimentConfig, base: dict, candidates: int) -> dict[str, dict]:
    """label -> overrides: the seeds, then `candidates` valid random samples of the space (seeded)."""
    tune = cfg.tune.model_copy(update={"algorithm": "random", "num_samples": max(1, candidates)})
    searcher = ScheduleSearcher(base, cfg.model_copy(update={"tune": tune}))
    out: dict[str, dict] = {}
    for i in range(searcher.total_trials):
        suggestion = searcher.suggest(f"bench-{i}")
        if not isinstance(suggestion, dict):
            break
        if suggestion["seed"] or tune.space:
            out[suggestion["label"]] = suggestion["overrides"]
    return out


def _point(report, schedule, wall: float) -> RungPoint:
    row = report.row_for(schedule)
    lo, hi = (None, None) if schedule.is_vanilla() else (row.relative_interval or (None, None))
    score = row.relative_score
    return RungPoint(
        score=-math.inf if score is None else score,  # undefined (a reference at 0): ranks last
        cost=row.vision_tflops,
        low=lo,
        high=hi,
        blind=blind_score(report),
        questions_run=report.questions_run or 0,
        batches_run=report.batches_run or 0,
        wall_s=wall,
    )


def run_search_bench(
    cfg: ExperimentConfig,
    base: dict,
    candidates: Optional[int] = None,
    budget: Optional[float] = None,
    progress: Optional[Callable[[str], None]] = None,
    orders: int = 1,
) -> dict:
    """`orders` > 1 also replays the multi-fidelity search on orders - 1 reshuffled rung orders (rung seeds
    seed + 1, ...) from the exhaustive pass's records, so no model runs for them, and confirms every
    replay's front too: how much the cost and the front depend on which questions the rungs drew."""
    if candidates is not None and candidates < 1:
        raise SearchBenchError(f"--candidates must be >= 1, not {candidates}")
    if budget is not None and not 0 < budget < math.inf:  # also NaN
        raise SearchBenchError(f"--budget must be a positive, finite number of vision TFLOPs, not {budget}")
    say = progress or (lambda msg: None)
    f = cfg.tune.fidelity or FidelityConfig()
    if cfg.tune.confirm is None:
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"confirm": ConfirmConfig()})})
    schedules, vlm, benches, held_out = _setup(cfg, base, candidates)
    try:
        say("reference: all tokens and blind on every search question")
        t0 = time.perf_counter()
        ref = reference_pass(cfg, vlm, benches)
        ref_wall = time.perf_counter() - t0
        stored = known_records(ref)
        exhaustive, scored = _exhaustive(cfg, vlm, schedules, benches, stored, say)
        seeds = [label for label in schedules if label.startswith("seed:")] if f.promote_seeds else []
        unpruned = ref.reference_row().vision_tflops  # the hypervolume's reference cost
        search = _multi_fidelity(cfg, vlm, schedules, benches, stored, seeds, unpruned, say)
        replays = []
        for k in range(1, orders):  # the same rule on reshuffled rung orders, from the exhaustive records
            say(f"replaying the rungs on question order {k + 1}/{orders}")
            replays.append(_replay(cfg, vlm, schedules, benches, stored, scored, seeds, unpruned, cfg.seed + k))
        return _compare(cfg, vlm, schedules, exhaustive, search, held_out, stored, budget, say, replays) | {
            "candidates": len(schedules),
            "rungs": f.rungs,
            "factor": f.factor,
            "promotion": f.promotion,
            "promote_seeds": f.promote_seeds,
            "reference": {"questions_run": ref.questions_run, "batches_run": ref.batches_run, "wall_s": ref_wall},
            "search_questions": {b.name: b.samples for b in ref.benchmarks},
            "notes": ref.notes,
        }
    except EvalError as e:
        raise SearchBenchError(str(e).splitlines()[0]) from None


def _setup(cfg: ExperimentConfig, base: dict, candidates: Optional[int]) -> tuple[dict, object, list, list]:
    """The candidate schedules by label, the model, the search's benchmarks and the held-out ones."""
    try:
        pool = candidate_set(cfg, base, candidates or cfg.tune.num_samples)
        schedules = {
            label: trial_config(base, o).main_schedule.model_copy(update={"name": label}) for label, o in pool.items()
        }
        return schedules, build_model(cfg), benchmarks_for(cfg), confirm_benchmarks(cfg)
    except (EvalSetupError, TuneSetupError) as e:
        raise SearchBenchError(str(e)) from None


def _exhaustive(cfg, vlm, schedules: dict, benches: list, stored, say) -> tuple[dict[str, RungPoint], dict[str, dict]]:
    """Every candidate on every search question: its point, and its records (label -> records)."""
    exhaustive: dict[str, RungPoint] = {}
    scored: dict[str, dict] = {}
    for i, (label, schedule) in enumerate(schedules.items()):
        say(f"exhaustive {i + 1}/{len(schedules)}: {label}")
        t0 = time.perf_counter()
        report = evaluate_schedule(cfg, vlm, schedule, benches, known=known_for(stored, schedule))
        exhaustive[label] = _point(report, schedule, time.perf_counter() - t0)
        scored[label] = known_records(report, [report.row_for(schedule).method])
    return exhaustive, scored


def _multi_fidelity(cfg, vlm, schedules: dict, benches: list, stored, seeds: list[str], ceiling, say) -> Search:
    """The multi-fidelity search, run: each rung scores only its new questions (a candidate's earlier
    rungs' records are reused), so its cost is what the search really pays."""
    f = cfg.tune.fidelity or FidelityConfig()
    own: dict[str, dict] = {label: {} for label in schedules}

    def evaluate_rung(label: str, rung: int) -> RungPoint:
        say(f"multi-fidelity rung {rung}/{f.rungs}: {label}")
        schedule = schedules[label]
        t0 = time.perf_counter()
        report = evaluate_schedule(
            cfg,
            vlm,
            schedule,
            benches,
            known={**known_for(stored, schedule), **own[label]},
            select=rung_select(rung, f.rungs, f.factor, cfg.seed),
        )
        own[label] = known_records(report, [report.row_for(schedule).method])
        return _point(report, schedule, time.perf_counter() - t0)

    return successive_halving(
        list(schedules), evaluate_rung, f.rungs, f.factor, always=seeds, rule=f.promotion, ceiling=ceiling
    )


def _replay(cfg, vlm, schedules, benches, stored, scored, seeds, ceiling, seed: int) -> Search:
    """The multi-fidelity search with rung order `seed`, every rung read from the exhaustive records:
    each point counts the questions the rung would have scored (its new ones), wall time 0."""
    f = cfg.tune.fidelity or FidelityConfig()
    seen: dict[str, int] = {}

    def evaluate_rung(label: str, rung: int) -> RungPoint:
        schedule = schedules[label]
        known = {**known_for(stored, schedule), **scored[label]}
        report = evaluate_schedule(
            cfg, vlm, schedule, benches, known=known, select=rung_select(rung, f.rungs, f.factor, seed)
        )
        point = _point(report, schedule, 0.0)
        n = sum(len(e.records or []) for e in report.row_for(schedule).benchmarks.values())
        point.questions_run, point.batches_run, seen[label] = n - seen.get(label, 0), 0, n
        return point

    return successive_halving(
        list(schedules), evaluate_rung, f.rungs, f.factor, always=seeds, rule=f.promotion, ceiling=ceiling
    )


def _front(points: dict[str, RungPoint]) -> list[str]:
    labels = list(points)
    return [labels[i] for i in pareto_front([(points[k].score, points[k].cost) for k in labels])]


def _best_under(points: dict[str, RungPoint], budget: float) -> Optional[str]:
    fits = [k for k, p in points.items() if p.cost <= budget]
    return max(fits, key=lambda k: (points[k].score, -points[k].cost)) if fits else None


def _completed(search: Search) -> dict[str, RungPoint]:
    # a candidate stopped at a low rung was scored on fewer questions: only full-fidelity ones compete
    return {k: search.final()[k] for k in search.completed()}


class _Confirmation:
    """The held-out pass of the schedules to confirm (with all tokens and blind), and how to read it."""

    def __init__(self, cfg, vlm, schedules: dict, labels: list[str], held_out: list, stored):
        seen = {b: list(rows) for b, rows in stored[REFERENCE].items()}
        self.schedules = schedules
        self.report = held_out_pass(cfg, vlm, [schedules[k] for k in labels], held_out, seen)
        self.reference = self.report.reference_row()
        self.overlap = seen_overlap(self.report, seen)
        select = unseen_select(seen)
        self.plans = [(b, select(b, b.samples())) for b in at_grid(vlm, held_out)]  # the questions it just scored
        self.blind = self.report.method("blind").relative_score  # the floor of the "above blind" hypervolume

    def row_name(self, label: str) -> str:
        return REFERENCE if self.schedules[label].is_vanilla() else label

    def score(self, label: str) -> list:
        """[confirmed relative score, low, high]."""
        row = self.reference if self.schedules[label].is_vanilla() else self.report.method(label)
        return [row.relative_score, *(row.relative_interval or [None, None])]

    def points(self, front: list[str], share: dict[str, float]) -> list[tuple[float, float]]:
        """(confirmed score, cost share) of a front's members that have a confirmed score."""
        return [(self.score(k)[0], share[k]) for k in front if self.score(k)[0] is not None]


def _compare(cfg, vlm, schedules, exhaustive, search: Search, held_out, stored, budget, say, replays=()) -> dict:
    costs = sorted(p.cost for p in exhaustive.values())
    budget = budget or cfg.tune.max_vision_tflops or costs[len(costs) // 2]  # default: the median candidate
    full = _completed(search)
    sides = {
        "exhaustive": (exhaustive, _front(exhaustive), _best_under(exhaustive, budget)),
        "multi_fidelity": (full, _front(full), _best_under(full, budget)),
    }
    replay_fronts = [_front(_completed(r)) for r in replays]
    confirm_labels = sorted(
        {k for _, front, best in sides.values() for k in [*front, best] if k} | {k for f in replay_fronts for k in f}
    )
    say(f"confirming {len(confirm_labels)} schedules on held-out questions")
    confirmed = _Confirmation(cfg, vlm, schedules, confirm_labels, held_out, stored)
    max_cost = costs[-1]
    share = {k: exhaustive[k].cost / max_cost for k in confirm_labels}  # a schedule's cost, either side
    out: dict = {
        "budget_vision_tflops": budget,
        "confirm_questions": {b.name: b.samples for b in confirmed.report.benchmarks},
        "blind_confirmed": confirmed.blind,
        "confirm_overlap": confirmed.overlap,
    }
    spent = {"exhaustive": list(exhaustive.values()), "multi_fidelity": search.every_point()}
    for side, (points, front, best) in sides.items():
        out[side] = _side_summary(points, front, best, spent[side], confirmed, share, max_cost)
    ex, mf = out["exhaustive"], out["multi_fidelity"]
    mf["completed"] = search.completed()
    mf["stopped"] = len(schedules) - len(search.completed())
    a, b = ex["best_under_budget"], mf["best_under_budget"]
    if a and b and a != b:  # the two bests on the same held-out questions, paired
        report, plans = confirmed.report, confirmed.plans
        d = compare_methods(report, plans, confirmed.row_name(a), confirmed.row_name(b), cfg.seed, cfg.eval.resamples)
        out["best_difference"] = d.model_dump()
    names = sorted({confirmed.row_name(k) for k in confirm_labels} | {"blind"})
    by_row = resampled_relative(confirmed.report, confirmed.plans, names, cfg.seed, cfg.eval.resamples)
    draws = {k: by_row[confirmed.row_name(k)] for k in confirm_labels}
    fronts = {k: v[1] for k, v in sides.items()}
    for key, floor, area in (
        ("hypervolume_difference", None, "hypervolume_confirmed"),
        ("hypervolume_difference_above_blind", by_row["blind"], "hypervolume_confirmed_above_blind"),
    ):
        hv = hypervolume_difference(draws, fronts, share, floor)
        if hv is not None:
            hv["difference"] = ex[area] - mf[area]
            hv["within_exhaustive_interval"] = bool(hv["exhaustive_interval"][0] <= mf[area])
        out[key] = hv
    out["cost_ratio"] = {k: (mf[k] / ex[k] if ex[k] else None) for k in ("questions_run", "batches_run", "wall_s")}
    if replays:
        searches = [(search, fronts["multi_fidelity"]), *zip(replays, replay_fronts)]
        rows = [_order_row(r, front, ex, draws, fronts, share, by_row["blind"], confirmed) for r, front in searches]
        out["orders"] = _orders_summary(rows)
    out["verdict"] = _verdict(out)
    return out


def _side_summary(points, front, best, spent, confirmed: _Confirmation, share, max_cost: float) -> dict:
    """One search's cost (what it spent), its front and best schedule under the budget, as searched and
    as confirmed on held-out questions."""
    return {
        "questions_run": sum(p.questions_run for p in spent),
        "batches_run": sum(p.batches_run for p in spent),
        "wall_s": sum(p.wall_s for p in spent),
        "front": front,
        "best_under_budget": best,
        "best_search": None if best is None else [points[best].score, points[best].low, points[best].high],
        "best_confirmed": None if best is None else confirmed.score(best),
        # cost as a share of the dearest candidate's: the area is in relative-score points x cost share
        "hypervolume_confirmed": hypervolume(confirmed.points(front, share), 1.0),
        "hypervolume_search": hypervolume([(points[k].score, points[k].cost / max_cost) for k in front], 1.0),
        # the area above blind: a blind-level point (answering as if without the image) adds nothing
        "hypervolume_confirmed_above_blind": hypervolume(confirmed.points(front, share), 1.0, confirmed.blind),
    }


def _order_row(search: Search, front, ex, draws, fronts, share, blind_draws, confirmed: _Confirmation) -> dict:
    """One rung order's multi-fidelity search against exhaustive: its cost ratio and its confirmed front."""
    pair = {"exhaustive": fronts["exhaustive"], "multi_fidelity": front}
    above = hypervolume_difference(draws, pair, share, blind_draws) or {}
    points = confirmed.points(front, share)
    area = hypervolume(points, 1.0, confirmed.blind)
    return {
        "questions_ratio": sum(p.questions_run for p in search.every_point()) / ex["questions_run"],
        "completed": len(search.completed()),
        "front": front,
        "hypervolume_confirmed": hypervolume(points, 1.0),
        "hypervolume_confirmed_above_blind": area,
        "difference_above_blind": [ex["hypervolume_confirmed_above_blind"] - area, above.get("low"), above.get("high")],
        "within_exhaustive_interval": bool(above) and above["exhaustive_interval"][0] <= area,
    }


def _orders_summary(rows: list[dict]) -> dict:
    """Over the rung orders (the first is the search's own): the spread of the cost ratio and of the
    confirmed loss above blind, and how often the loss is significant or outside exhaustive's interval."""
    ratios = [r["questions_ratio"] for r in rows]
    losses = [r["difference_above_blind"][0] for r in rows]
    return {
        "n": len(rows),
        "questions_ratio": {"mean": float(np.mean(ratios)), "min": min(ratios), "max": max(ratios)},
        "loss_above_blind": {"mean": float(np.mean(losses)), "min": min(losses), "max": max(losses)},
        "significant_loss": sum(1 for r in rows if (r["difference_above_blind"][1] or 0) > 0),
        "within_exhaustive_interval": sum(1 for r in rows if r["within_exhaustive_interval"]),
        "rows": rows,
    }


def hypervolume_difference(
    draws: dict[str, np.ndarray],
    fronts: dict[str, list[str]],
    cost_share: dict[str, float],
    floor: Optional[np.ndarray] = None,
) -> Optional[dict]:
    """Exhaustive's front hypervolume minus multi-fidelity's with a paired interval: `draws` holds every
    front member's relative score on the same resamples of the held-out questions, and both fronts'
    areas are recomputed on each (a member's cost share is fixed; only its score is uncertain). `floor`:
    blind's score on the same resamples, for the area above blind (else above 0). Also each front's own
    interval: "as good within its interval" is multi-fidelity's area above exhaustive's lower bound."""
    members = sorted({k for front in fronts.values() for k in front})
    if not members:
        return None
    n = len(draws[members[0]])

    def areas(front: list[str]) -> np.ndarray:
        low = np.zeros(n) if floor is None else floor
        return np.array([hypervolume([(draws[k][i], cost_share[k]) for k in front], 1.0, low[i]) for i in range(n)])

    ex, mf = areas(fronts["exhaustive"]), areas(fronts["multi_fidelity"])
    lo, hi = percentile_interval(ex - mf)
    return {
        "low": lo,
        "high": hi,
        "p_value": bootstrap_p(ex - mf),
        "exhaustive_interval": list(percentile_interval(ex)),
        "multi_fidelity_interval": list(percentile_interval(mf)),
    }


def _verdict(out: dict) -> str:
    """One honest line: the cost ratio, whether the confirmed best schedules under the budget are
    distinguishable, and whether the confirmed fronts' hypervolumes are."""
    ratio = out["cost_ratio"]["questions_run"]
    head = f"multi-fidelity scored {ratio:.2f}x the questions of exhaustive evaluation" if ratio is not None else ""
    return head + _best_text(out) + _front_text(out)


def _significance(d: dict) -> str:
    return "significant" if d["low"] > 0 or d["high"] < 0 else "not significant"


def _best_text(out: dict) -> str:
    ex, mf = out["exhaustive"], out["multi_fidelity"]
    a, b = ex["best_confirmed"], mf["best_confirmed"]
    if not a or not b or a[0] is None or b[0] is None:
        return "; no confirmed best schedule under the budget to compare"
    if ex["best_under_budget"] == mf["best_under_budget"]:
        return f"; both found the same best schedule under the budget ({ex['best_under_budget']})"
    d = out.get("best_difference")
    text = f"; confirmed best under the budget: exhaustive {a[0]:.1f} vs multi-fidelity {b[0]:.1f}"
    if not d:
        return text
    return (
        f"{text}, paired difference {d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] "
        f"({format_p(d['p_value'])}): {_significance(d)}"
    )


def _front_text(out: dict) -> str:
    text = ""
    for key, area, what in (
        ("hypervolume_difference", "hypervolume_confirmed", "confirmed front hypervolume"),
        ("hypervolume_difference_above_blind", "hypervolume_confirmed_above_blind", "above blind"),
    ):
        d = out.get(key)
        if not d:
            continue
        ex, mf = out["exhaustive"][area], out["multi_fidelity"][area]
        lo, hi = d["exhaustive_interval"]
        within = "within" if d["within_exhaustive_interval"] else "below"
        text += (
            f"; {what}: exhaustive {ex:.1f} [{lo:.1f}, {hi:.1f}] vs multi-fidelity {mf:.1f} ({within} its "
            f"interval), paired difference {d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] "
            f"({format_p(d['p_value'])}): {_significance(d)}"
        )
    return text
