"""One sweep's summary: typed trial records in; the Pareto front, the failure count, the hours and the blind
baseline's place out. Pure (no MLflow, no Ray): `hidrop tune` builds the records from Tune's results,
`hidrop report` from the MLflow runs it reads back, `hidrop demo` shows what `hidrop tune` returned."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

from pydantic import BaseModel, ConfigDict

from hidrop.evaluation.metrics import relative_score
from hidrop.evaluation.uncertainty import format_interval
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.pareto import pareto_front, significant_front


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
    relative_score_lo: Optional[float] = None  # the paired 95% interval against the sweep's reference
    relative_score_hi: Optional[float] = None
    blind_level: Optional[float] = None  # 1.0: not significantly above blind (a metric, so 0/1)
    rung: Optional[float] = None  # multi-fidelity: the last rung it was evaluated at
    questions_run: Optional[float] = None
    significant: bool = False  # on the front with significance (no cheaper point may be as good)
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
    pareto: list[str]  # labels on the front of the estimates, cheapest first
    significant: list[str]  # of those, the ones on the front with significance (and above blind)
    blind_level: list[str]  # front points whose score is not significantly above blind: never discoveries
    failed: int
    accelerator_hours: float  # the trials' own (the reference pass is not a trial)
    blind_relative_score: Optional[float]  # where answering without the image lands
    blind_relative_interval: Optional[list[float]] = None
    undefined: list[str] = []  # finished, but no relative score: the reference scored 0 where they were scored

    def outcomes(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.is_outcome()]

    def discoveries(self) -> list[str]:
        """Front points that are searched (not seeds) and above blind."""
        seeds = {t.label for t in self.trials if t.seed}
        return [p for p in self.pareto if p not in seeds and p not in self.blind_level]


class SweepReference(BaseModel):
    """The sweep's reference pass (`<sweep>/reference.json`, in this order): the all-tokens and blind
    scores, blind's relative score and interval, the benchmarks' signal, every question's record of both
    (trials reuse them, paired), the all-tokens vision TFLOPs, notes, questions and the config key."""

    model_config = ConfigDict(extra="allow")

    scores: dict[str, float]
    blind_scores: dict[str, float]
    blind_relative_score: Optional[float] = None
    blind_relative_interval: Optional[list[Optional[float]]] = None
    signal: dict[str, Any] = {}
    records: dict[str, dict[str, list[dict[str, Any]]]] = {}
    vision_tflops: Optional[float] = None
    notes: list[str] = []
    samples: Optional[int] = None
    key: Any = None

    def to_dict(self) -> dict:
        return self.model_dump(exclude_unset=True)


class SweepResult(BaseModel):
    """What `hidrop tune` returns and prints with `--json` (`to_dict`, in this order; the fields after
    `notes` are set as the sweep gets to them, and only those set are written)."""

    sweep: str
    trials: list[TrialRecord]  # seeds first, then cheapest first
    pareto: list[str]
    significant: list[str]
    blind_level: list[str]
    discoveries: list[str]
    reference_scores: dict[str, float]
    blind_relative_score: Optional[float]
    blind_relative_interval: Optional[list[float]]
    rejections: dict[str, int]
    rejected: int
    failed: int
    questions_run: int
    concurrency: int
    wall_time_s: float
    accelerator_hours: float
    undefined: list[str]
    notes: list[str]
    valid_share: Optional[float] = None
    confirm: Optional[dict[str, Any]] = None  # `confirm.confirm_front`'s table (the report reads the same)
    best_under_budget: Optional[str] = None  # objective `score`: set (None: nothing fits) only then
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    sweep_dir: Optional[str] = None

    def has(self, field: str) -> bool:
        """Was `field` set (the optional fields are written only then)."""
        return field in self.model_fields_set

    def to_dict(self) -> dict:
        """The `--json` document and `summary/sweep.json`: trials as `TrialRecord.to_dict`."""
        return self.model_dump(exclude_unset=True)


def full_fidelity(t: TrialRecord, rungs: Optional[int]) -> bool:
    """Was `t` scored on all of the sweep's questions (every trial without rungs; else the last rung)."""
    return rungs is None or t.rung is None or t.rung >= rungs


def summarize_sweep(
    trials: list[TrialRecord],
    reference_scores: Mapping[str, float],
    blind_scores: Mapping[str, float],
    blind_relative_interval: Optional[Sequence[float]] = None,
    blind_relative_score: Optional[float] = None,
    rungs: Optional[int] = None,
) -> SweepSummary:
    """The one rule for a sweep's front and counts: relative score up and vision TFLOPs down over the
    outcomes only, on the estimates and with significance (`pareto.significant_front`); a blind-level
    trial (its paired relative score not above blind's) can sit on the front but is never significant.
    Every record's `pareto` and `significant` is set. With `rungs` (a multi-fidelity sweep), a trial
    stopped before the last rung is an outcome but was scored on fewer questions: it stays off the front.
    `blind_relative_score`: blind's, as the reference pass computed it (over the benchmarks with signal);
    recomputed over every benchmark when not given."""
    scored = [t for t in trials if t.is_outcome() and full_fidelity(t, rungs)]
    for t in trials:
        t.pareto = t.significant = False
    points = [(t.relative_score, t.vision_tflops) for t in scored]
    intervals = [
        None
        if t.relative_score_lo is None or t.relative_score_hi is None
        else (t.relative_score_lo, t.relative_score_hi)
        for t in scored
    ]
    front = [scored[i] for i in pareto_front(points)]
    for t in front:
        t.pareto = True
    clear = [scored[i] for i in significant_front(points, intervals) if not scored[i].blind_level]
    for t in clear:
        t.significant = True
    ordered = sorted(
        trials,
        key=lambda t: (not t.seed, math.inf if t.vision_tflops is None else t.vision_tflops, t.label),
    )
    return SweepSummary(
        trials=ordered,
        pareto=[t.label for t in front],
        significant=[t.label for t in clear],
        blind_level=[t.label for t in front if t.blind_level],
        failed=sum(t.status == N.FAILED for t in trials),
        accelerator_hours=sum(t.accelerator_hours or 0.0 for t in trials),
        blind_relative_score=(
            blind_relative_score
            if blind_relative_score is not None
            else relative_score(dict(blind_scores), dict(reference_scores))
        ),
        blind_relative_interval=list(blind_relative_interval) if blind_relative_interval else None,
        undefined=[t.label for t in trials if t.status in N.OUTCOME_STATUSES and t.relative_score is None],
    )


def front_mark(record: TrialRecord) -> str:
    """How a trial sits on the front: "clear" (with significance), "yes" (on the estimates only),
    "blind level" (on the front, but not significantly above blind), or ""."""
    if not record.pareto:
        return ""
    if record.blind_level:
        return "blind level"
    return "clear" if record.significant else "yes"


def interval_text(record: TrialRecord) -> str:
    """`92.6 [81.0, 104.2]` from a trial's relative score and its bounds (the score alone without them)."""
    lo, hi = record.relative_score_lo, record.relative_score_hi
    return format_interval(record.relative_score, None if lo is None or hi is None else (lo, hi))


class TrialCells(NamedTuple):
    """The cells every sweep table shows for a trial (the CLI's, pareto.md and the report's "All trials")."""

    trial: TrialRecord
    label: str
    front: str  # `front_mark`
    relative: str  # relative score [95% CI]; "-" without a score


def table_rows(trials: Iterable[TrialRecord]) -> Iterator[TrialCells]:
    """The shared cells of each trial, in the order given (each table picks and orders its trials)."""
    for t in trials:
        yield TrialCells(t, t.label, front_mark(t), "-" if t.relative_score is None else interval_text(t))


def _triple_text(values: Sequence[Optional[float]]) -> str:
    score, lo, hi = (list(values) + [None, None, None])[:3]
    if score is None:
        return "-"
    return format_interval(score, None if lo is None or hi is None else (lo, hi))


def confirm_rows(confirm: Mapping[str, Any]) -> list[list[str]]:
    """The held-out confirmation as table rows: trial, vision TFLOPs, search score, confirmed score (both
    with their 95% intervals), the optimism gap (search minus confirmed)."""
    out = []
    for r in confirm.get("rows", []):
        gap = r.get("gap")
        out.append(
            [
                r["label"],
                f"{r['vision_tflops']:.4g}",
                _triple_text(r["search"]),
                _triple_text(r["confirmed"]),
                "-" if gap is None else f"{gap:+.1f}",
            ]
        )
    return out


CONFIRM_COLUMNS = ["trial", "vision TFLOPs", "search [95% CI]", "confirmed [95% CI]", "search - confirmed"]


def confirm_markdown(confirm: Mapping[str, Any]) -> list[str]:
    if not confirm.get("rows"):
        return []
    questions = ", ".join(f"{b} {n}" for b, n in confirm.get("benchmarks", {}).items())
    lines = [
        "",
        f"## Held-out confirmation ({questions} questions the search never saw)",
        "",
        "| " + " | ".join(CONFIRM_COLUMNS) + " |",
        "|" + "---|" * len(CONFIRM_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in confirm_rows(confirm)]
    gap = confirm.get("optimism_gap")
    if gap is not None:
        lines += ["", f"Optimism gap of the searched winners (mean search - confirmed): {gap:+.1f} points."]
    return lines
