"""The sweep's reference: the base model's all-tokens and blind scores and per-question records,
evaluated once per sweep (`reference.json` in the sweep folder), logged on the parent run, and reused,
paired, by every trial instead of being evaluated again."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from hidrop.evaluation.harness import EvalError, Known
from hidrop.evaluation.results import QuestionRecord
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import (
    EvalSetupError,
    benchmarks_for,
    build_model,
    known_for,
    reference_pass,
    write_records,
)
from hidrop_platform.tracking import names as N
from hidrop_platform.tune.errors import TuneSetupError
from hidrop_platform.tune.summary import SweepReference

REFERENCE_FILE = "reference.json"


def sweep_reference(
    cfg: ExperimentConfig, sweep_dir: Path, progress: Optional[Callable[[str], None]]
) -> SweepReference:
    """All-tokens and blind scores of the base model on the sweep's benchmarks, computed once per sweep."""
    path = sweep_dir / REFERENCE_FILE
    key = json.loads(
        json.dumps(
            {"model": cfg.model.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed}
        )
    )
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and "records" in cached:  # a sweep that did not start, run again as is
            return SweepReference.model_validate(cached)

    if progress:
        progress("evaluating the unpruned reference")

    try:
        vlm = build_model(cfg)
        report = reference_pass(cfg, vlm, benchmarks_for(cfg))
    except (EvalSetupError, EvalError, ValueError, KeyError) as e:
        raise TuneSetupError(f"reference evaluation: {str(e).splitlines()[0]}") from None
    reference, blind = report.reference_row(), report.method("blind")
    ref = SweepReference(
        scores=reference.scores(),
        blind_scores=blind.scores(),
        blind_relative_score=blind.relative_score,
        blind_relative_interval=blind.relative_interval,
        signal={b: c.model_dump() for b, c in (report.signal or {}).items()},
        # every question's record of both: trials reuse them, paired, instead of re-running them
        records={
            m.method: {b: [r.model_dump() for r in e.records or []] for b, e in m.benchmarks.items()}
            for m in (reference, blind)
        },
        vision_tflops=reference.vision_tflops,
        notes=report.notes,
        samples=report.samples_evaluated,
        key=key,
    )
    path.write_text(json.dumps(ref.to_dict()))
    write_records(report, sweep_dir / N.RECORDS_FILE)  # logged on the parent run as eval/records.jsonl.gz
    del vlm
    return ref


def _blind_bounds(reference: SweepReference) -> dict[str, float]:
    """Blind's relative score and interval for the parent run (the report reads them back)."""
    out = {}
    if reference.blind_relative_score is not None:
        out[N.BLIND_RELATIVE] = reference.blind_relative_score
    interval = reference.blind_relative_interval
    if interval and all(v is not None and math.isfinite(v) for v in interval):
        out[N.BLIND_RELATIVE_LOW], out[N.BLIND_RELATIVE_HIGH] = interval
    return out


def log_reference(parent, reference: SweepReference, sweep_dir: Path) -> None:
    """The reference's and blind's scores on the parent run, and the reference pass's records."""
    parent.log_metrics(
        N.per_benchmark(N.REFERENCE, reference.scores)
        | N.per_benchmark(N.BLIND, reference.blind_scores)
        | _blind_bounds(reference),
        step=0,
    )
    if (sweep_dir / N.RECORDS_FILE).is_file():
        parent.log_artifact(sweep_dir / N.RECORDS_FILE, N.RECORDS_DIR)


def stored_known(reference: SweepReference, schedule) -> Known:
    """The sweep's stored all-tokens and blind records as `evaluate(known=...)` takes them; a vanilla trial
    measures all tokens itself (it is that row)."""
    known = {
        method: {b: {r["id"]: QuestionRecord.model_validate(r) for r in rows} for b, rows in benches.items()}
        for method, benches in reference.records.items()
    }
    return known_for(known, schedule)
