"""`hidrop eval`: build the experiment's model, run its schedules and baselines on its benchmarks."""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from hidrop.assets import shipped_path
from hidrop.errors import UserError
from hidrop.evaluation.harness import REFERENCE, EvalError, Known, evaluate, model_shape
from hidrop.evaluation.published import eval_report_comparisons, model_key
from hidrop.evaluation.registry import get_benchmark
from hidrop.evaluation.results import EvalReport
from hidrop.evaluation.subsets import unseen_select
from hidrop.models import ModelLoadError, build_vlm
from hidrop.schedule import vanilla
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.storage import write_problem
from hidrop_platform.tracking import names as N


class EvalSetupError(UserError, RuntimeError):
    """The experiment cannot be evaluated as configured (one line for the CLI)."""


def resolve_path(path: Optional[str]) -> Optional[str]:
    """A relative path as given (from the working directory), else the installed package's copy, so shipped
    checkpoints such as checkpoints/mini_llava_projector work from anywhere (hidrop.assets)."""

    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path

    shipped = shipped_path(path)
    return str(shipped) if shipped is not None else path


def build_model(cfg: ExperimentConfig, device: Optional[str] = None):
    """The experiment's `VisionLanguageModel` on `device`, checked against the YAML's shape."""

    m = cfg.model.model_copy(update={"path": resolve_path(cfg.model.path)})
    device = device or cfg.eval.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        vlm = build_vlm(
            m.kind,
            m.path,
            feature=m.feature,
            dtype=m.dtype,
            attn_implementation=m.attn_implementation,
            seed=cfg.seed,
            num_layers=m.shape.num_layers,
        )
    except ModelLoadError as e:
        raise EvalSetupError(str(e)) from None
    except OSError as e:
        raise EvalSetupError(f"cannot load model from {m.path}: {str(e).splitlines()[0]}") from None
    if (vlm.num_layers, vlm.num_vision_tokens) != (m.shape.num_layers, m.shape.num_vision_tokens):
        raise EvalSetupError(
            f"model.shape says {m.shape.num_layers} layers / {m.shape.num_vision_tokens} vision tokens but the "
            f"loaded model has {vlm.num_layers} / {vlm.num_vision_tokens}; fix model.shape in the YAML"
        )
    try:
        vlm.model.to(device)
    except (AssertionError, RuntimeError) as e:  # no CUDA build / no such device
        raise EvalSetupError(f"cannot use device {device!r}: {str(e).splitlines()[0]}") from None
    return vlm


def benchmarks_for(cfg: ExperimentConfig, limit: Optional[int] = None) -> list:
    """The experiment's `eval.benchmarks`, built with its seed; `limit` replaces each one's own limit."""

    try:
        return [get_benchmark(b.name, limit=limit or b.limit, seed=cfg.seed, **b.options) for b in cfg.eval.benchmarks]
    except (KeyError, TypeError, ValueError) as e:  # unknown benchmark or option
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise EvalSetupError(f"eval.benchmarks: {msg}") from None


def eval_settings(cfg: ExperimentConfig) -> dict:
    """The experiment's eval settings as `evaluate` takes them: one place, so a sweep's reference, its
    trials, a confirmation and `hidrop eval` score the same way."""
    return dict(
        mode=cfg.eval.mode,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        seed=cfg.seed,
        require_signal=cfg.eval.require_signal,
        n_resamples=cfg.eval.resamples,
        relative=cfg.eval.relative,
    )


def reference_pass(cfg: ExperimentConfig, vlm, benchmarks: list) -> EvalReport:
    """All tokens and blind on `benchmarks`, with every question's record: what a search stores once and
    pairs each trial with."""
    shape = cfg.model.shape
    return evaluate(
        vlm,
        [vanilla(shape.num_layers, shape.num_vision_tokens)],
        benchmarks,
        baselines=["blind"],
        keep_records=True,
        **eval_settings(cfg),
    )


def known_for(known: Known, schedule) -> Known:
    """Stored records a trial may reuse: all of them, except that a vanilla schedule measures the all
    tokens row itself (it is that row)."""
    return {m: rows for m, rows in known.items() if not (schedule.is_vanilla() and m == REFERENCE)}


def held_out_pass(cfg: ExperimentConfig, vlm, schedules: list, benchmarks: list, seen: dict) -> EvalReport:
    """`schedules` (each named), all tokens and blind on the questions of `benchmarks` that are not in
    `seen` (benchmark -> question ids a search read): a confirmation, paired on those questions."""
    pruned = [s for s in schedules if not s.is_vanilla()]
    return evaluate(
        vlm,
        pruned or [vanilla(cfg.model.shape.num_layers, cfg.model.shape.num_vision_tokens)],
        benchmarks,
        baselines=["blind"],
        select=unseen_select(seen),
        keep_records=True,
        **eval_settings(cfg),
    )


def seen_overlap(report: EvalReport, seen: dict) -> int:
    """How many questions `report` scored that are in `seen`: zero for a confirmation, by construction."""
    ref = report.reference_row()
    return sum(len({r.id for r in e.records or []} & set(seen.get(b, ()))) for b, e in ref.benchmarks.items())


def run_eval(
    cfg: ExperimentConfig,
    progress: Optional[Callable[[int, int, str], None]] = None,
    vlm=None,
    keep_records: bool = False,
) -> EvalReport:
    torch.manual_seed(cfg.seed)
    vlm = vlm or build_model(cfg)
    schedules = cfg.schedules() if cfg.eval.include_compare else [cfg.main_schedule]
    benchmarks = benchmarks_for(cfg)
    try:
        report = evaluate(
            vlm,
            schedules,
            benchmarks,
            baselines=cfg.eval.baselines,
            progress=progress,
            keep_records=keep_records,
            **eval_settings(cfg),
        )
    except EvalError as e:
        raise EvalSetupError(str(e)) from None
    report.experiment = cfg.name
    report.device = str(vlm.device)
    attach_published(report, cfg)
    return report


def check_records_path(path: str | Path) -> Path:
    """Records are JSON lines: refuse any other file name, and a place that cannot be written, before an
    evaluation runs (not after it)."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise EvalSetupError(
            f"--records {path}: records are written as JSON lines; name the file *.jsonl or *.jsonl.gz"
        )
    problem = write_problem(path, folder=False)
    if problem is not None:
        raise EvalSetupError(f"--records {path}: {problem}")
    return path


def write_records(report: EvalReport, path: str | Path, methods=None) -> int:
    """The report's per-question records as JSON lines (gzip when the name ends in .gz), of `methods` only
    when given; returns the count."""
    path = check_records_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for row in report.record_rows(methods):
            f.write(json.dumps(row) + "\n")
            count += 1
    return count


def evaluate_schedule(
    cfg: ExperimentConfig, vlm, schedule, benchmarks: list, known: Optional[Known] = None, select=None
) -> EvalReport:
    """One schedule under the experiment's eval settings: a trial's or a trained model's evaluation. The
    unpruned reference is measured alongside unless `known` holds its records from an earlier pass (a
    sweep's stored reference, with blind's when it was run: then blind is in the report too, reused);
    `select` narrows the questions (a rung, a held-out split). Runs without gradients in eval mode and
    restores the model's mode."""

    return evaluate(
        vlm,
        [schedule],
        benchmarks,
        baselines=["blind"] if known and "blind" in known else [],
        known=known,
        select=select,
        keep_records=True,
        **eval_settings(cfg),
    )


def log_records(tracker, report: EvalReport, folder: str = N.RECORDS_DIR, methods=None) -> None:
    """Every question's record of `report` (of `methods` only, when given) as one compact artifact of the
    run (eval/records.jsonl.gz), so a later analysis reads them back without re-running a model."""
    if not tracker.enabled:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / N.RECORDS_FILE
        write_records(report, path, methods)
        tracker.log_artifact(path, folder)


def finite_interval(interval) -> bool:
    """An interval with two finite bounds (a resample with an undefined ratio gives NaN ones)."""
    return bool(interval) and all(v is not None and math.isfinite(v) for v in interval)


def blind_score(report: EvalReport) -> Optional[float]:
    """Blind's relative score in `report` (on the same questions as its other rows), if it ran."""
    row = next((m for m in report.methods if m.method == "blind"), None)
    score = None if row is None else row.relative_score
    return score if score is not None and math.isfinite(score) else None


def score_metrics(report: EvalReport, schedule) -> dict[str, float]:
    """The MLflow metrics of `schedule`'s scores: relative score, per-benchmark scores, and the unpruned
    model's per-benchmark scores when the report measured them alongside."""
    row, reference = report.row_for(schedule), report.reference_or_none()
    metrics = {N.RELATIVE_SCORE: row.relative_score}
    if finite_interval(row.relative_interval) and row is not reference:
        metrics[N.RELATIVE_SCORE_LOW], metrics[N.RELATIVE_SCORE_HIGH] = row.relative_interval
    metrics.update(N.per_benchmark(N.SCORE, row.scores()))
    intervals = {b: e.interval for b, e in row.benchmarks.items() if finite_interval(e.interval)}
    metrics.update(N.per_benchmark(N.SCORE_LOW, {b: i[0] for b, i in intervals.items()}))
    metrics.update(N.per_benchmark(N.SCORE_HIGH, {b: i[1] for b, i in intervals.items()}))
    if reference is not None and reference is not row and not reference.reused:
        metrics.update(N.per_benchmark(N.ALL_TOKENS, reference.scores()))
    if row.above_blind is not None and row is not reference:
        metrics[N.BLIND_LEVEL] = float(not row.above_blind)
    return metrics


def published_model(cfg: ExperimentConfig) -> Optional[str]:
    """The published model (hidrop/evaluation/published.yaml) the experiment's model is, if any."""

    return model_key(cfg.model.kind, cfg.model.path, cfg.eval.published)


def attach_published(report: EvalReport, cfg: ExperimentConfig) -> None:
    """Add the paper's matching rows and the differences to an eval report (`published`, per method),
    and a note for every partial match or self-contradicting paper row."""

    key = published_model(cfg)
    report.published_model = key
    report.published = eval_report_comparisons(report, key, cfg.eval.published_training)
    seen = set()
    for comparisons in report.published.values():
        for c in comparisons:
            for note in c["notes"]:
                if note not in seen:
                    seen.add(note)
                    report.notes.append(note)


def model_shape_for_cost(cfg: ExperimentConfig, vlm):
    """The loaded model's cost shape at the experiment's typical prompt length."""

    return model_shape(vlm, cfg.model.shape.text_tokens)
