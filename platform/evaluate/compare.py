"""`hidrop compare`: methods of different evaluations, paired on the questions they share.

`hidrop eval --records` keeps every question's score. Two trained models (HiDrop-trained under its
schedule, PDrop-trained under its own) are two evaluations, so no single report pairs them; their
record files do, by question id. Each spec is FILE:METHOD[=LABEL]; one label is the reference (e.g. the
all-tokens-trained model under all tokens: the paper's "% of the unpruned model"). Per benchmark the
questions every spec scored are kept, their units (a question, an MME pair, an MMBench group) are
resampled jointly for every label, and each label gets its benchmark scores (100 x the mean question
score) with intervals, its relative score against the reference (mean over benchmarks of label /
reference x 100) with a paired interval, and every pair of labels its paired difference of relative
scores with a bootstrap p-value.

Records carry each question's family (the probe suite's), so every score is also given per family
(`probes/counting`), resampled with the same draws. With a `baseline` label (usually blind), every
label's paired difference to it per benchmark and family says where a model uses the image at all.
Rows also carry each method's average vision tokens and vision TFLOPs when the records hold them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from hidrop.errors import UserError
from hidrop.evaluation.registry import relative_benchmarks
from hidrop.evaluation.uncertainty import (
    N_RESAMPLES,
    bootstrap_p,
    format_p,
    mcnemar_p,
    percentile_interval,
    unit_weights,
)
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import prepare
from hidrop_platform.tracking.tracker import Tracker

MAX_RESAMPLES = 100_000


class CompareError(UserError, ValueError):
    """A spec or record file that cannot be compared; one line for the user."""


@dataclass
class Records:
    """One method's rows of a `--records` file: benchmark -> question id -> (unit, score, family)."""

    questions: dict[str, dict[str, tuple[str, float, str]]]
    avg_vision_tokens: Optional[float] = None
    vision_tflops: Optional[float] = None


def parse_spec(spec: str) -> tuple[str, Path, str]:
    """FILE:METHOD[=LABEL] -> (label, file, method); the label defaults to METHOD@FILE's stem."""
    path, sep, rest = spec.rpartition(":")  # the file may hold ':' or '=' itself; METHOD=LABEL may not hold ':'
    method, _, label = rest.partition("=")
    if not sep or not path or not method:
        raise CompareError(f"{spec!r}: expected FILE:METHOD[=LABEL], e.g. runs/hidrop.jsonl:hidrop_tok64=HiDrop")
    path = Path(path)
    return (label or f"{method}@{path.name.split('.')[0]}"), path, method


def read_records(path: Path, method: Optional[str]) -> Records:
    """One method's records of a `--records` file (`method` None: the file's only method)."""
    if not path.is_file():
        raise CompareError(f"{path}: no such records file (write one with hidrop eval --records FILE.jsonl)")
    opener = gzip.open if path.name.endswith(".gz") else open
    out: dict[str, dict[str, tuple[str, float, str]]] = {}
    methods, costs = set(), {}
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                methods.add(row["method"])
                if row["method"] == method:
                    score = float(row["score"])
                    if not 0.0 <= score <= 1.0:  # also NaN; a question scores between 0 and 1
                        raise CompareError(
                            f"{path}: question {row['id']!r} of {row['benchmark']}: score {score} is not in [0, 1]"
                        )
                    out.setdefault(row["benchmark"], {})[str(row["id"])] = (
                        str(row["unit"]),
                        score,
                        str(row.get("family") or ""),
                    )
                    for key in ("avg_vision_tokens", "vision_tflops"):
                        if row.get(key) is not None:
                            costs[key] = float(row[key])
    except CompareError:  # a ValueError, but already one line
        raise
    except EOFError:  # gzip cut short; click would turn EOFError into a bare "Aborted."
        raise CompareError(f"{path}: truncated (the gzip stream ends early); write it again") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError, zlib.error) as e:
        raise CompareError(f"{path}: not a records file ({type(e).__name__}: {str(e)[:120]})") from None
    if method is None:
        if len(methods) != 1:
            held = ", ".join(sorted(methods))
            raise CompareError(f"{path}: records of {len(methods)} methods ({held}); expected one")
        return read_records(path, methods.pop())
    if not out:
        raise CompareError(f"{path}: no records of method {method!r}; it holds {', '.join(sorted(methods)) or 'none'}")
    return Records(out, **costs)


def _weighted_means(weights: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """100 x the bootstrap means; NaN where a resample drew none of these questions (a small family)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (weights @ scores) / weights.sum(axis=1)


def _difference(stats_a, stats_b, point: float, a: np.ndarray, b: np.ndarray, per_question: bool) -> dict:
    diff = stats_a - stats_b
    p = mcnemar_p(a, b) if per_question else None
    return {
        "difference": point,
        "interval": list(percentile_interval(diff)),
        "p_value": bootstrap_p(diff) if p is None else p,
    }


@dataclass
class _Scored:
    """Every label's scores on the questions all specs share, per key: a benchmark or benchmark/family."""

    benches: list[str]
    questions: dict[str, int] = field(default_factory=dict)  # benchmark -> questions kept
    families: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> its families
    points: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> key -> 100 x mean score
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # label -> key -> resampled scores
    raw: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # label -> key -> per-question scores
    per_question: dict[str, bool] = field(default_factory=dict)  # key -> one question per unit (McNemar)
    notes: list[str] = field(default_factory=list)

    @property
    def family_keys(self) -> list[str]:
        return [f"{b}/{f}" for b in self.benches for f in self.families[b]]


def compare(
    specs: list[str],
    reference: str,
    baseline: Optional[str] = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    relative_over: Optional[list[str]] = None,
) -> dict:
    """The comparison as a JSON-ready dict (see the module docstring). `relative_over`: the benchmarks the
    relative score averages (default: every shared one that is not diagnostic, i.e. not the probes); the
    others are still scored, with intervals."""
    if not 1 <= n_resamples <= MAX_RESAMPLES:  # each resample is a row of a (resamples x questions) matrix
        raise CompareError(f"--resamples {n_resamples}: give 1 to {MAX_RESAMPLES}")
    parsed = _labelled_specs(specs, reference, baseline)
    labels = [label for label, _, _ in parsed]
    loaded = {label: read_records(path, method) for label, path, method in parsed}
    scored = _score_shared({label: r.questions for label, r in loaded.items()}, reference, n_resamples, seed)
    averaged = _averaged_benchmarks(scored, reference, relative_over)
    relative = {label: _relative_draws(scored, label, reference, averaged) for label in labels}
    rows = [_row(scored, label, reference, baseline, averaged, relative[label], loaded[label]) for label in labels]
    return {
        "reference": reference,
        "baseline": baseline,
        "relative_over": averaged,
        "benchmarks": scored.questions,
        "families": {k: int(len(scored.raw[reference][k])) for k in scored.family_keys},
        "n_resamples": n_resamples,
        "specs": specs,
        "rows": rows,
        "pairs": _pairs(labels, rows, relative),
        "notes": scored.notes
        + [
            "scores are 100 x the mean per-question score on the shared questions "
            "(the official aggregate for mean metrics such as VQA accuracy)"
        ],
    }


def _labelled_specs(specs: list[str], reference: str, baseline: Optional[str]) -> list[tuple[str, Path, str]]:
    """The parsed specs, checked: distinct labels, among them the reference and the baseline."""
    parsed = [parse_spec(s) for s in specs]
    labels = [label for label, _, _ in parsed]
    if len(set(labels)) != len(labels):
        raise CompareError(f"labels must differ: {labels} (name them with FILE:METHOD=LABEL)")
    if reference not in labels:
        raise CompareError(f"--reference {reference!r} is none of the labels {labels}")
    if baseline is not None and baseline not in labels:
        raise CompareError(f"--baseline {baseline!r} is none of the labels {labels}")
    return parsed


def _score_shared(data: dict[str, dict], reference: str, n_resamples: int, seed: int) -> _Scored:
    """Every label's scores on the benchmarks and questions every spec scored, resampled jointly: one
    draw of units per benchmark (the reference's units) serves every label and family."""
    benches = sorted(set.intersection(*(set(d) for d in data.values())))
    if not benches:
        raise CompareError("the specs share no benchmark")
    scored = _Scored(benches, points={k: {} for k in data}, stats={k: {} for k in data}, raw={k: {} for k in data})
    unshared = sorted(set.union(*(set(d) for d in data.values())) - set(benches))
    if unshared:
        scored.notes.append(
            f"left out, not scored by every spec: {', '.join(unshared)} (the relative scores cover {benches})"
        )
    rng = np.random.default_rng(seed)
    for bench in benches:
        _score_benchmark(scored, bench, data, reference, n_resamples, rng)
    return scored


def _score_benchmark(scored: _Scored, bench: str, data: dict[str, dict], reference: str, n_resamples: int, rng) -> None:
    """One benchmark's shared questions into `scored`: the benchmark and each of its families."""
    ids = sorted(set.intersection(*(set(d[bench]) for d in data.values())))
    dropped = len(set.union(*(set(d[bench]) for d in data.values()))) - len(ids)
    if not ids:
        raise CompareError(f"{bench}: the specs share no question")
    if dropped:
        scored.notes.append(
            f"{bench}: {len(ids)} questions every spec scored; {dropped} scored by some only are left out"
        )
    units = [data[reference][bench][i][0] for i in ids]
    family_of = np.array([data[reference][bench][i][2] for i in ids])
    weights = unit_weights(units, n_resamples, rng)
    scored.questions[bench] = len(ids)
    one_per_unit = len(set(units)) == len(units)
    groups = {bench: np.ones(len(ids), dtype=bool)}
    scored.families[bench] = sorted(f for f in set(family_of) if f) if len(set(family_of)) > 1 else []
    for fam in scored.families[bench]:
        groups[f"{bench}/{fam}"] = family_of == fam
    for label in data:
        scores = np.array([data[label][bench][i][1] for i in ids])
        for key, mask in groups.items():
            scored.raw[label][key] = scores[mask]
            scored.points[label][key] = 100.0 * scores[mask].mean()
            scored.stats[label][key] = _weighted_means(weights[:, mask], scores[mask])
            scored.per_question[key] = one_per_unit


def _averaged_benchmarks(scored: _Scored, reference: str, relative_over: Optional[list[str]]) -> list[str]:
    """The benchmarks the relative score averages, checked: each shared, none the reference scores 0 on."""
    benches = scored.benches
    if relative_over:
        missing = [b for b in relative_over if b not in benches]
        if missing:
            raise CompareError(f"--relative {','.join(missing)}: not a benchmark every spec scored ({benches})")
    averaged = relative_benchmarks(benches, relative_over or None)
    if averaged != benches:
        why = "--relative" if relative_over else "diagnostic by default; --relative chooses"
        scored.notes.append(f"relative scores over {', '.join(averaged)} only ({why})")
    zero = [b for b in averaged if scored.points[reference][b] == 0]
    if zero:
        raise CompareError(f"the reference {reference!r} scores 0 on {', '.join(zero)}: no relative score is defined")
    return averaged


def _relative_draws(scored: _Scored, label: str, reference: str, averaged: list[str]) -> np.ndarray:
    """The label's relative score on every resample (NaN where a ratio is undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = [scored.stats[label][b] / scored.stats[reference][b] for b in averaged]
    return 100.0 * np.mean(ratios, axis=0)


def _row(
    scored: _Scored,
    label: str,
    reference: str,
    baseline: Optional[str],
    averaged: list[str],
    relative: np.ndarray,
    cost: Records,
) -> dict:
    """One label's row: scores and intervals per benchmark and family, relative score, cost, and its
    paired differences to the baseline when there is one."""
    points, stats, benches, family_keys = scored.points[label], scored.stats[label], scored.benches, scored.family_keys
    point = [points[b] / scored.points[reference][b] for b in averaged]
    row = {
        "label": label,
        "scores": {b: points[b] for b in benches},
        "intervals": {b: list(percentile_interval(stats[b])) for b in benches},
        "families": {k: points[k] for k in family_keys},
        "family_intervals": {k: list(percentile_interval(stats[k])) for k in family_keys},
        "relative_score": float(100.0 * np.mean(point)),
        "relative_interval": None if label == reference else list(percentile_interval(relative)),
        "avg_vision_tokens": cost.avg_vision_tokens,
        "vision_tflops": cost.vision_tflops,
    }
    if baseline is not None and label != baseline:
        row["vs_baseline"] = {
            k: _difference(
                stats[k],
                scored.stats[baseline][k],
                points[k] - scored.points[baseline][k],
                scored.raw[label][k],
                scored.raw[baseline][k],
                scored.per_question[k],
            )
            for k in [*benches, *family_keys]
        }
    return row


def _pairs(labels: list[str], rows: list[dict], relative: dict[str, np.ndarray]) -> list[dict]:
    """Every pair of labels: the paired difference of their relative scores, with interval and p-value."""
    pairs = []
    for a, b in itertools.combinations(labels, 2):
        with np.errstate(invalid="ignore"):  # a resample whose ratio is undefined stays NaN, then ignored
            diff = relative[a] - relative[b]
        ra = next(r for r in rows if r["label"] == a)["relative_score"]
        rb = next(r for r in rows if r["label"] == b)["relative_score"]
        pairs.append(
            {
                "a": a,
                "b": b,
                "difference": ra - rb,
                "interval": list(percentile_interval(diff)),
                "p_value": bootstrap_p(diff),
            }
        )
    return pairs


def columns(result: dict) -> list[str]:
    """The score columns of a comparison: each benchmark followed by its families."""
    families = result.get("families", {})
    return [k for b in result["benchmarks"] for k in (b, *(f for f in families if f.startswith(b + "/")))]


def pair_text(pair: dict, minus: str = "-") -> str:
    """One pairwise difference as text: `A - B: +1.2 [-0.3, +2.7] points, p = 0.11`."""
    lo, hi = pair["interval"]
    return (
        f"{pair['a']} {minus} {pair['b']}: {pair['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}] points, "
        f"{format_p(pair['p_value'])}"
    )


def above_baseline(result: dict, label: str) -> list[str]:
    """The benchmarks and families on which `label` scores significantly above the baseline."""
    row = next(r for r in result["rows"] if r["label"] == label)
    return [k for k, d in (row.get("vs_baseline") or {}).items() if d["interval"][0] > 0]


def log_comparison(result: dict, tracking_uri: str, experiment: str) -> Optional[str]:
    """The comparison as one MLflow run (hidrop.kind=compare): per label its relative score and bounds,
    per benchmark and family its score, and the whole result as compare/compare.json, which `hidrop
    report` reads for its Table 1 layout across evaluations. Returns the run id (None while offline)."""
    prepare(tracking_uri, experiment)
    tracker = Tracker(
        tracking_uri, experiment, run_name=f"compare:{result['reference']}", tags={N.KIND: N.KIND_COMPARE}
    ).start()
    tracker.log_params(
        {
            N.COMPARE_REFERENCE: result["reference"],
            N.COMPARE_BASELINE: result["baseline"] or "",
            N.COMPARE_SPECS: " ".join(result["specs"])[:6000],
        }
    )
    metrics: dict[str, float] = {}
    for row in result["rows"]:
        label = N.safe_metric_part(row["label"])
        metrics[f"{N.RELATIVE_SCORE}/{label}"] = row["relative_score"]
        if row["relative_interval"]:
            metrics[f"{N.RELATIVE_SCORE_LOW}/{label}"], metrics[f"{N.RELATIVE_SCORE_HIGH}/{label}"] = row[
                "relative_interval"
            ]
        for key, value in {**row["scores"], **row["families"]}.items():
            metrics[f"{N.SCORE}{label}/{key}"] = value
    tracker.log_metrics(metrics, step=0)
    tracker.log_dict(result, N.COMPARE_ARTIFACT)
    tracker.finish()
    return tracker.run_id
