"""Question subsets that keep a benchmark's units whole: the rungs of a multi-fidelity search (nested
prefixes of one seeded order) and a held-out confirmation's unseen questions.

Both are `evaluate(select=...)` callables: `(benchmark, samples) -> samples`. A unit is what the metric
aggregates over (`Benchmark.unit`: an MME image pair, an MMBench circular group), so a subset never
splits one; rung prefixes deal units round-robin over the strata (POPE's splits), so every rung keeps
the benchmark's mix.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from typing import Callable, Collection, Sequence

import numpy as np

from hidrop.evaluation.registry import Benchmark
from hidrop.sample import Sample

Select = Callable[[Benchmark, list[Sample]], list[Sample]]


def _units(bench: Benchmark, samples: Sequence[Sample]) -> dict[tuple[str, str], list[int]]:
    units: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        units[(bench.stratum(s), bench.unit(s))].append(i)
    return units


def unit_order(bench: Benchmark, samples: Sequence[Sample], seed: int) -> list[list[int]]:
    """The benchmark's units (lists of sample indices) in one seeded order: shuffled within each stratum,
    then dealt round-robin over the strata. Depends only on the samples, the benchmark's name and `seed`."""
    by_stratum: dict[str, list[list[int]]] = defaultdict(list)
    for (stratum, _), idx in _units(bench, samples).items():
        by_stratum[stratum].append(idx)
    rng = np.random.default_rng([seed, zlib.crc32(bench.name.encode())])
    shuffled = []
    for stratum in sorted(by_stratum):
        groups = by_stratum[stratum]
        shuffled.append([groups[i] for i in rng.permutation(len(groups))])
    order = []
    for depth in range(max((len(g) for g in shuffled), default=0)):
        order.extend(g[depth] for g in shuffled if depth < len(g))
    return order


def rung_share(rung: int, rungs: int, factor: int) -> float:
    """The share of each benchmark's units rung `rung` (1-based) evaluates: 1 / factor^(rungs - rung)."""
    if not 1 <= rung <= rungs:
        raise ValueError(f"rung {rung} is outside 1..{rungs}")
    return float(factor) ** (rung - rungs)


def rung_select(rung: int, rungs: int, factor: int, seed: int) -> Select:
    """The questions of rung `rung`: the first ceil(share x units) units of `unit_order` (at least one), in
    the samples' own order. Rungs are nested: rung r + 1 holds every question of rung r."""
    share = rung_share(rung, rungs, factor)

    def select(bench: Benchmark, samples: list[Sample]) -> list[Sample]:
        order = unit_order(bench, samples, seed)
        take = max(1, math.ceil(share * len(order) - 1e-9))
        keep = sorted(i for unit in order[:take] for i in unit)
        return [samples[i] for i in keep]

    return select


def unseen_select(seen: dict[str, Collection[str]]) -> Select:
    """The questions of each benchmark whose whole unit is unseen: `seen` maps a benchmark's name to the
    question ids a search evaluated. A unit with any seen question is dropped whole."""

    def select(bench: Benchmark, samples: list[Sample]) -> list[Sample]:
        ids = set(seen.get(bench.name, ()))
        if not ids:
            return samples
        drop = {key for key, idx in _units(bench, samples).items() if any(samples[i].id in ids for i in idx)}
        return [s for s in samples if (bench.stratum(s), bench.unit(s)) not in drop]

    return select
