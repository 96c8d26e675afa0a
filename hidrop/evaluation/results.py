"""The evaluation result as typed records: what `evaluate` returns and every reader (the CLI's tables,
Tune's trial metrics, training's eval-after, diagnostics, the published comparisons) reads.

`to_dict()` gives the JSON form `hidrop eval --json` prints; `EvalReport.model_validate(...)` reads it back.
A benchmark's own figures (`family/...`, `category/...`, POPE's per-split F1) ride along as extra keys.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from hidrop.schedule import Schedule


class BenchmarkResult(BaseModel):
    """One method on one benchmark: the official score plus the benchmark's own breakdown (extra keys)."""

    model_config = ConfigDict(extra="allow")

    score: float
    samples: int
    mode: str
    evidence_recall: Optional[list[float]] = None  # per drop, benchmarks with evidence only
    predictions: Optional[dict[str, str]] = None  # question id -> answer, with keep_predictions=True

    def figures(self) -> dict[str, Any]:
        """The benchmark's own figures beyond `score` (family/..., category/..., per-split F1)."""
        return dict(self.__pydantic_extra__ or {})


class MethodResult(BaseModel):
    """One schedule or baseline over every benchmark, with its cost at the model's shape."""

    method: str
    kind: str  # "schedule" or a baseline: all_tokens, blind, random, oracle
    schedule: Optional[dict] = None  # the Schedule's JSON form; None for blind
    plan: str
    benchmarks: dict[str, BenchmarkResult]
    relative_score: Optional[float]
    avg_vision_tokens: float
    measured_avg_vision_tokens: Optional[float] = None
    vision_tflops: float
    model_tflops: float

    def scores(self) -> dict[str, float]:
        return {b: e.score for b, e in self.benchmarks.items()}

    def as_schedule(self) -> Optional[Schedule]:
        return None if self.schedule is None else Schedule.model_validate(self.schedule)


class ModelInfo(BaseModel):
    kind: str
    num_layers: int
    num_vision_tokens: int


class BenchmarkPlan(BaseModel):
    name: str
    samples: int
    mode: str


class EvalReport(BaseModel):
    model: ModelInfo
    reference: str  # the method every relative score is against (all_tokens)
    methods: list[MethodResult]
    samples_evaluated: int
    benchmarks: list[BenchmarkPlan]
    mean_text_tokens: float
    wall_time_s: float
    notes: list[str] = []
    # set by the platform's `hidrop eval`
    experiment: Optional[str] = None
    device: Optional[str] = None
    published_model: Optional[str] = None
    published: Optional[dict[str, list[dict]]] = None  # method -> the paper's matching rows, compared

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(f"no method {name!r} in the report; it has {[m.method for m in self.methods]}")

    def reference_row(self) -> MethodResult:
        return next(m for m in self.methods if m.kind == self.reference)

    def row_for(self, schedule: Schedule) -> MethodResult:
        """`schedule`'s row; a vanilla schedule is reported as the all-tokens row."""
        if schedule.is_vanilla():
            return self.methods[0]
        return next(m for m in self.methods if m.kind == "schedule")

    def benchmark_names(self) -> list[str]:
        return [b.name for b in self.benchmarks]

    def to_dict(self) -> dict:
        """The JSON form (fields the run never set, such as predictions, are left out)."""
        return self.model_dump(exclude_unset=True)
