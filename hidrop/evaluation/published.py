"""The paper's published results (published.yaml, shipped in the package) and the comparisons shown
beside measured ones in `hidrop eval` and `hidrop report`.

A published row is found for a measured one by model (a key of `models` in the file), method family
(vanilla / fastv / pdrop / hidrop, read from the schedule's structure, not its name) and budget (average
vision tokens, see `same_budget`). The comparison is made on the benchmarks both sides have: per-benchmark
differences (measured - published) and the Avg (%) of each side over those benchmarks against its own
reference (the measured unpruned model, the paper's unpruned row). The paper's printed Avg (%) is kept
next to the recomputed one, and a row whose printed figure disagrees with its own scores says so.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from typing import Iterable, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from hidrop.errors import UserError
from hidrop.evaluation.metrics import relative_score
from hidrop.evaluation.paper import PAPER_BENCHMARKS, PAPER_NAMES
from hidrop.evaluation.results import EvalReport
from hidrop.schedule import PositionMode, Schedule

Method = Literal["vanilla", "fastv", "pdrop", "hidrop"]
Training = Literal["training_free", "trained", "trained_eval_training_free"]
Layout = Literal["table1", "table2", "table10"]
TRAINING_LABELS = {
    "training_free": "training-free",
    "trained": "trained",
    "trained_eval_training_free": "trained, evaluated training-free",
}
# the paper prints Avg (%) to one decimal: a row whose scores give a figure further than this from the
# printed one disagrees with itself (method.md section 11: only HiDrop 80 does)
AVG_TOLERANCE = 0.1
# which tables a layout looks in, in order: Table 1's layout falls back to Table 2's rows (PDrop at 270
# tokens, the 2.7B model) and the other way round
LAYOUT_TABLES: dict[str, tuple[str, ...]] = {
    "table1": ("table1", "table2"),
    "table2": ("table2", "table1"),
    "table10": ("table10",),
}


class PublishedError(UserError, ValueError):
    """A published-results file or request that cannot be used (one line)."""


class PublishedRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    label: str
    method: Method
    tokens: float
    training: Training
    scores: dict[str, float]
    avg_published: float
    preset: Optional[str] = None
    position_mode: Optional[PositionMode] = None
    train_gpu_hours: Optional[float] = None
    infer_tflops: Optional[float] = None
    note: Optional[str] = None

    def describe(self) -> str:
        setting = "" if self.method == "vanilla" else f", {TRAINING_LABELS[self.training]}"
        return f"paper: {self.label}{setting}, {self.tokens:g} tokens"


class PublishedTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    layout: Layout
    model: str
    reference: str  # the id of the unpruned row every Avg (%) of this table is against
    avg_over: list[str]
    rows: list[PublishedRow]


class AverageRow(BaseModel):
    """A figure the paper prints only as an Avg (%), with the setting it varies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    avg_published: float
    position_mode: Optional[PositionMode] = None
    inject_layer: Optional[int] = None
    exit_layer: Optional[int] = None
    drop_layers: Optional[list[int]] = None


class AverageTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    model: str
    rows: list[AverageRow]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str


class Published(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    models: dict[str, ModelInfo]
    tables: dict[str, PublishedTable]
    averages: dict[str, AverageTable] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "Published":
        ids = [r.id for t in self.tables.values() for r in t.rows]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"row id(s) {dup} appear twice")
        for name, table in [*self.tables.items(), *self.averages.items()]:
            if table.model not in self.models:
                raise ValueError(f"{name}: unknown model {table.model!r} (models: {sorted(self.models)})")
        for name, table in self.tables.items():
            if table.reference not in ids:
                raise ValueError(f"{name}: reference {table.reference!r} is no row's id")
            unknown = sorted({b for b in table.avg_over if b not in PAPER_BENCHMARKS})
            if unknown:
                raise ValueError(f"{name}: unknown benchmark(s) {unknown}")
            for r in table.rows:
                if set(r.scores) != set(table.avg_over):
                    raise ValueError(
                        f"{name}/{r.id}: scores for {sorted(r.scores)}, the table averages {sorted(table.avg_over)}"
                    )
        return self

    def row(self, row_id: str) -> PublishedRow:
        return next(r for t in self.tables.values() for r in t.rows if r.id == row_id)

    def table_of(self, row: PublishedRow) -> tuple[str, PublishedTable]:
        return next((n, t) for n, t in self.tables.items() if row in t.rows)

    def reference_of(self, row: PublishedRow) -> PublishedRow:
        return self.row(self.table_of(row)[1].reference)

    def recomputed_avg(self, row: PublishedRow, benchmarks: Optional[Iterable[str]] = None) -> float:
        """The row's Avg (%) from its own scores: the harness's `relative_score` against the table's
        reference row, over `benchmarks` (default: those the table averages)."""
        table = self.table_of(row)[1]
        keep = list(table.avg_over if benchmarks is None else benchmarks)
        ref = self.reference_of(row).scores
        value = relative_score({b: row.scores[b] for b in keep}, {b: ref[b] for b in keep})
        if value is None:
            raise PublishedError(f"{row.id}: no benchmark to average")
        return value

    def disagreement(self, row: PublishedRow) -> Optional[str]:
        """A sentence when the printed Avg (%) and the row's own scores disagree, else None."""
        again = self.recomputed_avg(row)
        if abs(again - row.avg_published) <= AVG_TOLERANCE:
            return None
        return (
            f"the paper prints Avg {row.avg_published:.1f}% for {row.label} ({row.tokens:g} tokens) but its own "
            f"scores give {again:.2f}%"
        )

    def matches(
        self,
        model: str,
        method: str,
        tokens: float,
        layout: str = "table1",
        training: str = "any",
        position_mode: Optional[str] = None,
        preset: Optional[str] = None,
    ) -> list[PublishedRow]:
        """The published rows of `model` for this method at this budget (or, `preset`, run with exactly the
        row's own preset: the paper prints 64 tokens for its MobileLLaMA setting, which averages 57.6 as
        method.md gives it), from the first table
        of the layout's list that has any; `training` filters the pruned rows (the unpruned one always
        matches)."""
        if layout not in LAYOUT_TABLES:
            raise PublishedError(f"unknown layout {layout!r}; choose from {sorted(LAYOUT_TABLES)}")
        for wanted in LAYOUT_TABLES[layout]:
            found = []
            for table in self.tables.values():
                if table.layout != wanted or table.model != model:
                    continue
                for r in table.rows:
                    if r.method != method or not (same_budget(tokens, r.tokens) or (preset and r.preset == preset)):
                        continue
                    if method != "vanilla" and training != "any" and r.training != training:
                        continue
                    if (
                        position_mode is not None
                        and r.position_mode is not None
                        and r.position_mode.value != position_mode
                    ):
                        continue
                    found.append(r)
            if found:
                return found
        return []


@functools.cache
def load_published() -> Published:
    """The shipped published.yaml, validated (cached: the file is package data and never changes)."""
    text = importlib.resources.files("hidrop.evaluation").joinpath("published.yaml").read_text(encoding="utf-8")
    return Published.model_validate(yaml.safe_load(text))


def same_budget(measured: float, published: float) -> bool:
    """The same token budget: within 1 token or 2% (80.03 is the paper's 80; 306 is not 270)."""
    return abs(measured - published) <= max(1.0, 0.02 * published)


def exact_preset(name: Optional[str], plan: Optional[str]) -> Optional[str]:
    """`name` when it is a preset and `plan` (`Schedule.describe()`) is exactly that preset's per-layer
    plan at the paper's shape (32 layers, 576 tokens); None for an adjusted or unknown schedule."""
    from hidrop.schedule import PRESETS, preset

    if not name or name not in PRESETS or not plan:
        return None
    return name if preset(name).describe() == plan else None


def schedule_method(schedule: Schedule) -> str:
    """The method family of a schedule, from what it does: late injection or early exit is HiDrop;
    pruning scored by a layer's own attention is FastV; pruning scored by the next layer is PDrop."""
    if schedule.is_vanilla():
        return "vanilla"
    if schedule.inject_layer > 1 or schedule.exit_layer is not None:
        return "hidrop"
    if any(d.scored_by == d.after_layer for d in schedule.drops):
        return "fastv"
    return "pdrop"


def method_from_name(name: str) -> Optional[str]:
    """The method family of a preset or schedule name (runs logged before `schedule.method` existed)."""
    name = name.removeprefix("seed:").lower()
    for family in ("vanilla", "fastv", "pdrop", "hidrop"):
        if name.startswith(family):
            return family
    return "vanilla" if name in ("all_tokens", "all tokens") else None


_LLAVA15_7B = re.compile(r"llava[-_ ]?v?1[._-]?5[-_ ]?7b", re.IGNORECASE)


def model_key(kind: Optional[str], path: Optional[str], marked: Optional[str] = "auto") -> Optional[str]:
    """Which published model a measured one is: `marked` (eval.published) when it names one, "none" for
    nothing, "auto" (default) for a llava_hf model whose path names LLaVA-1.5-7B."""
    marked = "auto" if marked in (None, "", "None") else marked
    if marked == "none":
        return None
    if marked != "auto":
        known = load_published().models
        if marked not in known:
            raise PublishedError(
                f"eval.published={marked!r} is not a published model; choose from "
                f"auto, none, {', '.join(sorted(known))}"
            )
        return marked
    if kind == "llava_hf" and path and _LLAVA15_7B.search(str(path)):
        return "llava15_7b"
    return None


@dataclasses.dataclass
class Comparison:
    """One measured row against one published row, on the benchmarks both have."""

    row: PublishedRow
    table: str
    benchmarks: list[str]  # shared, in the paper's order
    published: dict[str, float]
    deltas: dict[str, float]  # measured - published
    measured_avg: Optional[float]  # over the shared benchmarks, against the measured reference
    published_avg: float  # recomputed over the shared benchmarks, against the paper's reference
    published_avg_printed: Optional[float]  # the paper's figure, when every benchmark it averages was measured
    delta_avg: Optional[float]
    not_measured: list[str]  # the paper has them, the measurement does not
    not_published: list[str]  # measured, the paper has no figure
    disagreement: Optional[str]

    @property
    def partial(self) -> bool:
        return bool(self.not_measured or self.not_published)

    def notes(self) -> list[str]:
        out = []
        if self.not_measured and self.benchmarks:
            out.append(
                f"{self.row.describe()}: not measured here: "
                f"{', '.join(PAPER_NAMES.get(b, b) for b in self.not_measured)} "
                f"(Avg over the {len(self.benchmarks)} shared benchmarks)"
            )
        if self.not_published:
            out.append(f"{self.row.describe()}: the paper has no figure for {', '.join(self.not_published)}")
        if self.disagreement:
            out.append(self.disagreement)
        return out

    def to_dict(self) -> dict:
        return {
            "id": self.row.id,
            "label": self.row.label,
            "description": self.row.describe(),
            "table": self.table,
            "method": self.row.method,
            "tokens": self.row.tokens,
            "training": self.row.training,
            "benchmarks": self.benchmarks,
            "published": self.published,
            "deltas": self.deltas,
            "measured_avg": self.measured_avg,
            "published_avg": self.published_avg,
            "published_avg_printed": self.published_avg_printed,
            "delta_avg": self.delta_avg,
            "not_measured": self.not_measured,
            "not_published": self.not_published,
            "train_gpu_hours": self.row.train_gpu_hours,
            "infer_tflops": self.row.infer_tflops,
            "disagreement": self.disagreement,
            "notes": self.notes(),
        }


def compare(
    measured: Mapping[str, Optional[float]],
    measured_reference: Optional[Mapping[str, Optional[float]]],
    row: PublishedRow,
    published: Optional[Published] = None,
) -> Comparison:
    """`measured` (benchmark -> score) against the published `row`, on the benchmarks both have (and,
    when a measured reference is given, that it scored above 0: the Avg of both sides rests on them)."""
    published = published or load_published()
    table = published.table_of(row)[1]
    have = {b for b, v in measured.items() if v is not None and v == v}
    if measured_reference is not None:
        have = {
            b
            for b in have
            if measured_reference.get(b) not in (None, 0) and measured_reference[b] == measured_reference[b]
        }
    shared = [b for b in PAPER_BENCHMARKS if b in have and b in row.scores]
    deltas = {b: float(measured[b]) - row.scores[b] for b in shared}
    measured_avg = None
    if measured_reference is not None and shared:
        measured_avg = relative_score({b: measured[b] for b in shared}, {b: measured_reference[b] for b in shared})
    # nothing shared (a training without scores): the paper's own figure, for its cost columns' sake
    published_avg = published.recomputed_avg(row, shared or None)
    complete = not shared or set(shared) == set(table.avg_over)
    return Comparison(
        row=row,
        table=table.title,
        benchmarks=shared,
        published={b: row.scores[b] for b in shared},
        deltas=deltas,
        measured_avg=measured_avg,
        published_avg=published_avg,
        published_avg_printed=row.avg_published if complete else None,
        delta_avg=None if measured_avg is None else measured_avg - published_avg,
        not_measured=[b for b in table.avg_over if b not in shared],
        not_published=sorted(b for b in measured if measured[b] is not None and b not in row.scores),
        disagreement=published.disagreement(row),  # a property of the paper's row, shown with any match
    )


def comparisons_for(
    model: Optional[str],
    method: Optional[str],
    tokens: Optional[float],
    measured: Mapping[str, Optional[float]],
    measured_reference: Optional[Mapping[str, Optional[float]]],
    layout: str = "table1",
    training: str = "any",
    position_mode: Optional[str] = None,
    preset: Optional[str] = None,
) -> list[Comparison]:
    """Every published row matching a measured one, compared with it: [] when nothing matches or no
    benchmark is shared, except in Table 2's layout, where the paper's cost figures stand on their own."""
    if model is None or method is None or tokens is None:
        return []
    published = load_published()
    rows = published.matches(
        model, method, tokens, layout=layout, training=training, position_mode=position_mode, preset=preset
    )
    out = [compare(measured, measured_reference, r, published) for r in rows]
    return [c for c in out if c.benchmarks or layout == "table2"]


def eval_report_comparisons(report: EvalReport, model: Optional[str], training: str = "any") -> dict[str, list[dict]]:
    """For an `evaluate` report: method name -> its published comparisons (Table 1's layout), for the
    unpruned row and every schedule; baselines (blind, random, oracle) have no published row."""
    if model is None:
        return {}
    ref_scores = report.reference_row().scores()
    out = {}
    for r in report.methods:
        if r.kind not in ("schedule", report.reference):
            continue
        schedule = r.as_schedule()
        found = comparisons_for(
            model,
            schedule_method(schedule),
            r.avg_vision_tokens,
            r.scores(),
            ref_scores,
            training=training,
            preset=exact_preset(schedule.name, schedule.describe()),
        )
        if found:
            out[r.method] = [c.to_dict() for c in found]
    return out
