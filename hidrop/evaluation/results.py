"""The evaluation result as typed records: what `evaluate` returns and every reader (the CLI's tables,
Tune's trial metrics, training's eval-after, diagnostics, the published comparisons) reads.

`to_dict()` gives the JSON form `hidrop eval --json` prints; `EvalReport.model_validate(...)` reads it back.
A benchmark's own figures (`family/...`, `category/...`, POPE's per-split F1) ride along as extra keys.
"""

from __future__ import annotations

from typing import Any, Collection, Iterator, Optional

from pydantic import BaseModel, ConfigDict

from hidrop.schedule import Schedule


class QuestionRecord(BaseModel):
    """One scored question: what a later analysis needs without re-running the model."""

    id: str
    family: str = ""
    prediction: str
    reference: Optional[str] = None
    score: float  # the per-question score (0/1, or the VQA soft score)
    unit: str  # what the official metric aggregates over (the question, an MME image pair, an MMBench group)


class PairedDifference(BaseModel):
    """A - B on the same questions: the point difference, its paired bootstrap interval, a p-value (exact
    McNemar for 0/1 scores, else the paired bootstrap's)."""

    difference: float
    low: float
    high: float
    p_value: Optional[float] = None

    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


class BenchmarkResult(BaseModel):
    """One method on one benchmark: the official score plus the benchmark's own breakdown (extra keys)."""

    model_config = ConfigDict(extra="allow")

    score: float
    samples: int
    mode: str
    evidence_recall: Optional[list[float]] = None  # per drop, benchmarks with evidence only
    predictions: Optional[dict[str, str]] = None  # question id -> answer, with keep_predictions=True
    interval: Optional[list[float]] = None  # 95% bootstrap interval of `score` [low, high]
    vs_reference: Optional[PairedDifference] = None  # score - all tokens' score, paired
    records: Optional[list[QuestionRecord]] = None  # with keep_records=True

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
    relative_interval: Optional[list[float]] = None  # paired with the reference on the same resamples
    like_reference: Optional[bool] = None  # the relative score's interval contains 100
    like_blind: Optional[bool] = None  # its paired difference to blind's relative score is not significant
    above_blind: Optional[bool] = None  # that difference is significantly positive (else: blind level)
    reused: bool = False  # every score came from earlier records (`evaluate(known=...)`), none measured here

    def scores(self) -> dict[str, float]:
        return {b: e.score for b, e in self.benchmarks.items()}

    def as_schedule(self) -> Optional[Schedule]:
        return None if self.schedule is None else Schedule.model_validate(self.schedule)


class SignalCheck(BaseModel):
    """Does the model use the image on this benchmark: all tokens vs blind, paired."""

    reference: float
    reference_interval: list[float]
    blind: float
    blind_interval: list[float]
    difference: PairedDifference
    excluded: bool = False  # left out of the relative score (eval.require_signal)

    def has_signal(self) -> bool:
        return self.difference.low > 0


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
    n_resamples: Optional[int] = None  # bootstrap resamples behind every interval
    signal: Optional[dict[str, SignalCheck]] = None  # per benchmark, when blind ran
    relative_over: Optional[list[str]] = None  # the benchmarks every relative score averages
    questions_run: Optional[int] = None  # (method, question) pairs the model scored in this run
    batches_run: Optional[int] = None  # method x batch passes through the model in this run
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

    def reference_or_none(self) -> Optional[MethodResult]:
        """The reference's row (measured here or reused from earlier records), None when it is absent."""
        return next((m for m in self.methods if m.kind == self.reference), None)

    def reference_row(self) -> MethodResult:
        row = self.reference_or_none()
        if row is None:
            raise KeyError(f"the report has no {self.reference} row")
        return row

    def row_for(self, schedule: Schedule) -> MethodResult:
        """`schedule`'s row; a vanilla schedule is reported as the all-tokens row."""
        if schedule.is_vanilla():
            return self.methods[0]
        return next(m for m in self.methods if m.kind == "schedule")

    def benchmark_names(self) -> list[str]:
        return [b.name for b in self.benchmarks]

    def to_dict(self, records: bool = True) -> dict:
        """The JSON form (fields the run never set, such as predictions, are left out; `records=False`
        leaves the per-question records out too)."""
        exclude = None
        if not records:
            exclude = {"methods": {"__all__": {"benchmarks": {"__all__": {"records"}}}}}
        return self.model_dump(exclude_unset=True, exclude=exclude)

    def record_rows(self, methods: Optional[Collection[str]] = None) -> Iterator[dict]:
        """Every kept per-question record, flat: method, benchmark, then the record's fields (of `methods`
        only, when given: a trial logs its own, not the sweep's stored reference). Each row carries its
        method's average vision tokens and vision TFLOPs, so a records file alone says what a score cost."""
        for m in self.methods:
            if methods is not None and m.method not in methods:
                continue
            cost = {"avg_vision_tokens": m.avg_vision_tokens, "vision_tflops": m.vision_tflops}
            for b, e in m.benchmarks.items():
                for r in e.records or []:
                    yield {"method": m.method, "benchmark": b, **r.model_dump(), **cost}
