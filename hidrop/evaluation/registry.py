"""The benchmark registry: every benchmark (offline here, the paper's eleven later) plugs in the same way.

A benchmark yields `Sample`s, scores one prediction with its official rule, and aggregates per-sample
scores into its reported figures. The harness never needs to know which benchmark it runs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from hidrop.evaluation.metrics import exact_match, mean
from hidrop.sample import Sample

BENCHMARKS: dict[str, type["Benchmark"]] = {}


class Benchmark:
    """Base class. Subclasses set `name`, implement `load()`, and override `score`/`aggregate` when the
    official rule differs from exact match averaged x 100."""

    name: str = ""
    # "closed": rank the closed answer vocabulary by next-token logits (one forward, no generation);
    # "generate": greedy generation then the official matching rule
    default_mode: str = "closed"
    description: str = ""
    # a diagnostic benchmark is scored and reported but stays out of the default relative score (probes:
    # on the trained mini-LLaVA most families are not above blind; README "The probes are diagnostic")
    diagnostic: bool = False

    def __init__(self, limit: Optional[int] = None, seed: int = 0, **options):
        self.limit = limit
        self.seed = seed
        self.options = options
        self._samples: Optional[list[Sample]] = None

    def load(self) -> list[Sample]:
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = self.load()
        return self._samples

    def score(self, sample: Sample, prediction: str) -> float:
        return exact_match(prediction, sample.answer or "")

    def unit(self, sample: Sample) -> str:
        """What the official metric aggregates over, for resampling (hidrop.evaluation.uncertainty): the
        question, unless a benchmark scores groups of questions together."""
        return sample.id

    def stratum(self, sample: Sample) -> str:
        """Resampling keeps each stratum's size (POPE: its splits, averaged as separate scores)."""
        return ""

    def relabel(self, sample: Sample, copy: int) -> Sample:
        """`sample` as the `copy`-th draw of its unit in a resample, so that `aggregate` counts a unit drawn
        twice as two units (benchmarks that group by a key override this with a distinct key)."""
        return sample

    @classmethod
    def mean_score(cls) -> bool:
        """The score is 100 x the mean per-question score (the base aggregate): resampling needs no loop."""
        return cls.aggregate is Benchmark.aggregate

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
        """{"score": the headline figure, plus per-family figures}, all in percent."""
        out = {"score": 100.0 * mean(scores)}
        families = sorted({s.family for s in samples if s.family})
        if len(families) > 1:
            for fam in families:
                out[f"family/{fam}"] = 100.0 * mean(sc for s, sc in zip(samples, scores) if s.family == fam)
        return out


def relative_benchmarks(names: Sequence[str], chosen: Optional[Sequence[str]] = None) -> list[str]:
    """The benchmarks of `names` a relative score averages: `chosen` (in `names`' order), or by default
    every one that is not diagnostic (all of them when every one is)."""
    if chosen is not None:
        return [n for n in names if n in chosen]
    _load_builtin()
    kept = [n for n in names if not (n in BENCHMARKS and BENCHMARKS[n].diagnostic)]
    return kept or list(names)


def register(name: str) -> Callable[[type[Benchmark]], type[Benchmark]]:
    def wrap(cls: type[Benchmark]) -> type[Benchmark]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        cls.name = name
        BENCHMARKS[name] = cls
        return cls

    return wrap


def get_benchmark(name: str, **kwargs) -> Benchmark:
    _load_builtin()
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](**kwargs)


def known_benchmarks() -> list[str]:
    _load_builtin()
    return sorted(BENCHMARKS)


def _load_builtin() -> None:
    import hidrop.evaluation.offline  # noqa: F401  (registers on import)
    import hidrop.evaluation.paper  # noqa: F401
