"""How sure a score is: seeded bootstrap intervals over each benchmark's own unit, paired across methods.

Every method is scored on the same questions, so every resample draws the same units for all of them:
intervals of differences and of the relative score (method / all tokens) are paired, and the difficulty
the methods share cancels. A unit is what the official metric aggregates over: a question, an MME image
pair (acc+ needs both questions right), an MMBench circular group; POPE resamples questions within each
split (its score is the mean of the per-split F1). A resample recomputes the benchmark's own `aggregate`
on the drawn units, so every metric gets the interval of exactly what it reports.

Percentile intervals from `N_RESAMPLES` resamples (a fixed seed per benchmark: reruns give the same
bounds). Exact McNemar (`scipy.stats.binomtest` on the discordant pairs) for two methods' 0/1 answers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95


class Resampler:
    """The bootstrap draws of one benchmark's questions, shared by every method scored on them."""

    def __init__(self, benchmark, samples: Sequence, seed: int = 0, n_resamples: int = N_RESAMPLES):
        self.benchmark, self.samples, self.n_resamples = benchmark, list(samples), n_resamples
        self._copies: dict[tuple[int, int], object] = {}
        units: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            units[(benchmark.stratum(s), benchmark.unit(s))].append(i)
        by_stratum: dict[str, list[list[int]]] = defaultdict(list)
        for (stratum, _), idx in units.items():
            by_stratum[stratum].append(idx)
        self.units = [u for groups in by_stratum.values() for u in groups]
        rng = np.random.default_rng(seed)
        # per resample: which units, drawn with replacement within each stratum
        offset = 0
        columns = []
        for groups in by_stratum.values():
            columns.append(rng.integers(0, len(groups), size=(n_resamples, len(groups))) + offset)
            offset += len(groups)
        picks = np.concatenate(columns, axis=1) if columns else np.zeros((n_resamples, 0), dtype=int)
        self.unit_picks = picks  # (n_resamples, units)
        # the common case (one question per unit, score = 100 x mean): one matrix, no Python loop
        self.fast = benchmark.mean_score() and all(len(u) == 1 for u in self.units)
        if self.fast:
            flat = np.array([u[0] for u in self.units], dtype=int)
            self.sample_picks = flat[picks] if len(flat) else picks

    def statistics(self, scores: Sequence[float]) -> np.ndarray:
        """The benchmark's score on every resample of these per-question scores."""
        scores = np.asarray(scores, dtype=float)
        if self.fast:
            return 100.0 * scores[self.sample_picks].mean(axis=1)
        out = np.empty(self.n_resamples)
        for r in range(self.n_resamples):
            drawn, idx, seen = [], [], defaultdict(int)
            for u in self.unit_picks[r]:
                copy = seen[u]
                seen[u] += 1
                for i in self.units[u]:
                    drawn.append(self._copy(i, copy))
                    idx.append(i)
            out[r] = self.benchmark.aggregate(drawn, scores[idx].tolist())["score"]
        return out

    def _copy(self, i: int, copy: int):
        """Sample i as its unit's `copy`-th draw (cached: resamples repeat the same few copies)."""
        key = (i, copy)
        if key not in self._copies:
            self._copies[key] = self.samples[i] if copy == 0 else self.benchmark.relabel(self.samples[i], copy)
        return self._copies[key]


def unit_weights(units: Sequence[str], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, questions): how often each question is drawn when its units (`units[i]` is question
    i's) are resampled with replacement. Weighted means of per-question scores by these rows are the
    bootstrap means; every method weighed by the same rows is paired."""
    names = sorted(set(units))
    index = {u: k for k, u in enumerate(names)}
    of_question = np.array([index[u] for u in units], dtype=int)
    picks = rng.integers(0, len(names), size=(n_resamples, len(names)))
    counts = np.zeros((n_resamples, len(names)))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), len(names)), picks.ravel()), 1.0)
    return counts[:, of_question]


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_relative(method: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    """The relative score (mean over benchmarks of method / reference x 100) on every resample, from the
    two methods' statistics on the SAME resamples; NaN where a reference resample is 0."""
    ratios = []
    for b, ref in reference.items():
        if b in method:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios.append(np.where(ref != 0, method[b] / ref, np.nan))
    if not ratios:
        return np.full(1, np.nan)
    return 100.0 * np.mean(ratios, axis=0)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference" from the resampled differences."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    if not len(d):
        return math.nan
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Exact McNemar p-value for two methods' 0/1 scores on the same questions (None if not 0/1)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        return None
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


# ---- on an evaluation report -------------------------------------------------------------------------
def _difference(point: float, resampled: np.ndarray, a: Sequence[float], b: Sequence[float], per_question: bool):
    """`per_question`: the score is the mean over independent questions, so McNemar applies; grouped or
    non-mean metrics (MME pairs, MMBench groups, POPE's F1) take the bootstrap's p-value."""
    from hidrop.evaluation.results import PairedDifference

    lo, hi = percentile_interval(resampled)
    p = mcnemar_p(a, b) if per_question else None
    return PairedDifference(difference=point, low=lo, high=hi, p_value=bootstrap_p(resampled) if p is None else p)


def resampled_relative(
    report, plans: Sequence[tuple], names: Sequence[str], seed: int = 0, n_resamples: int = N_RESAMPLES
):
    """Each named method's relative score on every resample, all of them and the reference drawn together
    on the same questions (the seeds `attach_intervals` uses), over the benchmarks the relative score
    keeps: name -> array (n_resamples,). `plans`: (benchmark, samples) per benchmark as evaluated; the
    report must carry records (keep_records=True)."""
    ref = report.reference_row()
    kept = [b_ for b_ in _averaged(report, ref) if not (report.signal and report.signal[b_].excluded)]
    resamplers = {
        plan[0].name: Resampler(plan[0], plan[1], seed=seed * 1_000_003 + i, n_resamples=n_resamples)
        for i, plan in enumerate(plans)
        if plan[0].name in kept
    }
    ref_stats = {b: r.statistics([q.score for q in ref.benchmarks[b].records]) for b, r in resamplers.items()}
    out = {}
    for name in names:
        m = report.method(name)
        stats = {b: r.statistics([q.score for q in m.benchmarks[b].records]) for b, r in resamplers.items()}
        out[name] = paired_relative(stats, ref_stats)
    return out


def compare_methods(report, plans: Sequence[tuple], a: str, b: str, seed: int = 0, n_resamples: int = N_RESAMPLES):
    """Relative score of method `a` minus method `b`, paired: both and the reference resampled together on
    the same questions (`resampled_relative`). Returns a PairedDifference (bootstrap p-value)."""
    from hidrop.evaluation.results import PairedDifference

    rel = resampled_relative(report, plans, [a, b], seed, n_resamples)
    diff = rel[a] - rel[b]
    lo, hi = percentile_interval(diff)
    point = report.method(a).relative_score - report.method(b).relative_score
    return PairedDifference(difference=point, low=lo, high=hi, p_value=bootstrap_p(diff))


def _averaged(report, ref) -> list[str]:
    """The benchmarks the report's relative scores average (all of the reference's when unset)."""
    over = report.relative_over
    return [b for b in ref.benchmarks if over is None or b in over]


def format_p(p: Optional[float]) -> str:
    """`p = 0.011`, or `p < 0.001`: a resampled p-value of 0 only says it is below the resolution."""
    if p is None or not math.isfinite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2g}"


def format_interval(score: Optional[float], interval: Optional[Sequence[float]]) -> str:
    """`62.5 [54.2, 70.8]` (the score alone when it has no interval; "undefined" without a score, e.g. a
    relative score against a reference that scored 0)."""
    if score is None:
        return "undefined"
    if not interval:
        return f"{score:.1f}"
    return f"{score:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def attach_intervals(
    report,
    plans: Sequence[tuple],
    raw: dict[str, dict[str, list[float]]],
    seed: int = 0,
    require_signal: bool = False,
    n_resamples: int = N_RESAMPLES,
) -> None:
    """Fill a report's intervals: every score's, each method's paired difference to all tokens per
    benchmark, the paired relative-score interval, "like all tokens" / "like blind", and all tokens vs
    blind per benchmark. With `require_signal`, a benchmark where all tokens is not significantly above
    blind is left out of every relative score, with a note saying so (unless none has signal).
    `plans`: (benchmark, samples, ...) per benchmark; `raw`: method -> benchmark -> per-question scores."""
    from hidrop.evaluation.metrics import relative_score
    from hidrop.evaluation.results import SignalCheck

    if n_resamples <= 0:
        return  # intervals switched off (a caller that only needs point estimates)
    resamplers = {
        plan[0].name: Resampler(plan[0], plan[1], seed=seed * 1_000_003 + i, n_resamples=n_resamples)
        for i, plan in enumerate(plans)
    }
    stats = {m.method: {b: resamplers[b].statistics(raw[m.method][b]) for b in m.benchmarks} for m in report.methods}
    for m in report.methods:
        for b, e in m.benchmarks.items():
            e.interval = list(percentile_interval(stats[m.method][b]))
    report.n_resamples = n_resamples
    ref = report.reference_or_none()
    if ref is None:
        return  # scored against an earlier pass's figures: no reference questions to pair with
    for m in report.methods:
        if m is ref:
            continue
        for b, e in m.benchmarks.items():
            diff = stats[m.method][b] - stats[ref.method][b]
            e.vs_reference = _difference(
                e.score - ref.benchmarks[b].score, diff, raw[m.method][b], raw[ref.method][b], resamplers[b].fast
            )
    blind = next((m for m in report.methods if m.kind == "blind"), None)
    kept = _averaged(report, ref)
    if blind is not None:
        report.signal = {}
        for b, e in ref.benchmarks.items():
            be = blind.benchmarks[b]
            diff = _difference(
                e.score - be.score,
                stats[ref.method][b] - stats[blind.method][b],
                raw[ref.method][b],
                raw[blind.method][b],
                resamplers[b].fast,
            )
            report.signal[b] = SignalCheck(
                reference=e.score,
                reference_interval=e.interval,
                blind=be.score,
                blind_interval=be.interval,
                difference=diff,
            )
        silent = [b for b, c in report.signal.items() if not c.has_signal() and b in kept]
        if silent and require_signal and len(silent) < len(kept):
            kept = [b for b in kept if b not in silent]
            for b in silent:
                c = report.signal[b]
                c.excluded = True
                report.notes.append(
                    f"{b}: all tokens {format_interval(c.reference, c.reference_interval)} vs blind "
                    f"{format_interval(c.blind, c.blind_interval)}: no signal, excluded from the relative score"
                )
            for m in report.methods:
                m.relative_score = relative_score({b: m.benchmarks[b].score for b in kept}, ref.scores())
        elif silent:
            why = "on none of the benchmarks, so all are kept" if require_signal else "kept in the relative score"
            report.notes.append(
                f"all tokens is not significantly above blind on {', '.join(silent)}: "
                f"no signal there; {why}; relative scores there measure noise"
            )
    ref_stats = {b: stats[ref.method][b] for b in kept}
    relative = {m.method: paired_relative({b: stats[m.method][b] for b in kept}, ref_stats) for m in report.methods}
    for m in report.methods:
        m.relative_interval = list(percentile_interval(relative[m.method]))
        lo, hi = m.relative_interval
        if m is not ref and math.isfinite(lo) and math.isfinite(hi):  # undefined ratios: no verdict
            m.like_reference = bool(lo <= 100.0 <= hi)
        if blind is not None and m is not blind:
            lo, hi = percentile_interval(relative[m.method] - relative[blind.method])
            if math.isfinite(lo) and math.isfinite(hi):
                m.like_blind = bool(lo <= 0.0 <= hi)
                m.above_blind = bool(lo > 0.0)
