"""One sweep's summary: typed trial records in; the Pareto front, the failure count, the hours and the blind
baseline's place out. Pure (no MLflow, no Ray): `hidrop tune` builds the records from Tune's results,
`hidrop report` from the MLflow runs it reads back, `hidrop demo` shows what `hidrop tune` returned."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict

from hidrop.evaluation.metrics import relative_score
from hidrop_platform import mlflow_names as N
from hidrop_platform.pareto import pareto_front


class TrialRecord(BaseModel):
    """One trial: its outcome metrics (the names of `N.TRIAL_METRICS`), per-benchmark scores and status.
    Readers add their own fields (the report: run id, plan, searched values, published-row keys)."""

    model_config = ConfigDict(extra="allow")

    label: str
    seed: bool = False  # a paper preset seeded into the search, not a searched point
    status: str  # N.FINISHED, N.STOPPED_EARLY, N.FAILED, ...
    scores: dict[str, float] = {}
    pareto: bool = False
    relative_score: Optional[float] = None
    vision_tflops: Optional[float] = None
    model_tflops: Optional[float] = None
    avg_vision_tokens: Optional[float] = None
    measured_avg_vision_tokens: Optional[float] = None
    accelerator_hours: Optional[float] = None
    wall_s: Optional[float] = None
    train_step: Optional[float] = None
    samples: Optional[float] = None

    @classmethod
    def from_metrics(cls, label: str, status: str, metrics: Mapping[str, float], **fields: Any) -> "TrialRecord":
        """A record from a trial's metrics as it logged them (Tune's last result, or its MLflow run)."""
        outcome = {k: metrics[k] for k in N.TRIAL_METRICS if k in metrics}
        return cls(label=label, status=status, scores=N.strip_prefix(N.SCORE, metrics), **outcome, **fields)

    def is_outcome(self) -> bool:
        """Its figures are a result: it finished (or ASHA stopped it after an evaluation) with a relative
        score and a cost. A failed or killed trial's last metrics are not one."""
        return self.status in N.OUTCOME_STATUSES and self.relative_score is not None and self.vision_tflops is not None

    def to_dict(self) -> dict:
        return self.model_dump(exclude_unset=True)


assert set(N.TRIAL_METRICS) <= set(TrialRecord.model_fields), "every trial metric needs a TrialRecord field"


class SweepSummary(BaseModel):
    trials: list[TrialRecord]  # seeds first, then cheapest first
    pareto: list[str]  # labels on the front, cheapest first
    failed: int
    accelerator_hours: float  # the trials' own (the reference pass is not a trial)
    blind_relative_score: Optional[float]  # where answering without the image lands

    def outcomes(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.is_outcome()]


def summarize_sweep(
    trials: list[TrialRecord], reference_scores: Mapping[str, float], blind_scores: Mapping[str, float]
) -> SweepSummary:
    """The one rule for a sweep's front and counts: relative score up and vision TFLOPs down over the
    outcomes only; every record's `pareto` is set."""
    scored = [t for t in trials if t.is_outcome()]
    for t in trials:
        t.pareto = False
    front = [scored[i] for i in pareto_front([(t.relative_score, t.vision_tflops) for t in scored])]
    for t in front:
        t.pareto = True
    ordered = sorted(
        trials,
        key=lambda t: (not t.seed, math.inf if t.vision_tflops is None else t.vision_tflops, t.label),
    )
    return SweepSummary(
        trials=ordered,
        pareto=[t.label for t in front],
        failed=sum(t.status == N.FAILED for t in trials),
        accelerator_hours=sum(t.accelerator_hours or 0.0 for t in trials),
        blind_relative_score=relative_score(dict(blind_scores), dict(reference_scores)),
    )
