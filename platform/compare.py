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
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np

from hidrop.evaluation.uncertainty import N_RESAMPLES, bootstrap_p, percentile_interval, unit_weights


class CompareError(ValueError):
    """A spec or record file that cannot be compared; one line for the user."""


def parse_spec(spec: str) -> tuple[str, Path, str]:
    """FILE:METHOD[=LABEL] -> (label, file, method); the label defaults to METHOD@FILE's stem."""
    path, sep, rest = spec.rpartition(":")  # the file may hold ':' or '=' itself; METHOD=LABEL may not hold ':'
    method, _, label = rest.partition("=")
    if not sep or not path or not method:
        raise CompareError(f"{spec!r}: expected FILE:METHOD[=LABEL], e.g. runs/hidrop.jsonl:hidrop_tok64=HiDrop")
    path = Path(path)
    return (label or f"{method}@{path.name.split('.')[0]}"), path, method


def read_records(path: Path, method: str) -> dict[str, dict[str, tuple[str, float]]]:
    """benchmark -> question id -> (unit, score) of one method in a `--records` file."""
    if not path.is_file():
        raise CompareError(f"{path}: no such records file (write one with hidrop eval --records FILE.jsonl)")
    opener = gzip.open if path.name.endswith(".gz") else open
    out: dict[str, dict[str, tuple[str, float]]] = {}
    methods = set()
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                methods.add(row["method"])
                if row["method"] == method:
                    out.setdefault(row["benchmark"], {})[str(row["id"])] = (str(row["unit"]), float(row["score"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as e:
        raise CompareError(f"{path}: not a records file ({type(e).__name__}: {str(e)[:120]})") from None
    if not out:
        raise CompareError(f"{path}: no records of method {method!r}; it holds {', '.join(sorted(methods)) or 'none'}")
    return out


def compare(specs: list[str], reference: str, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """The comparison as a JSON-ready dict (see the module docstring)."""
    parsed = [parse_spec(s) for s in specs]
    labels = [label for label, _, _ in parsed]
    if len(set(labels)) != len(labels):
        raise CompareError(f"labels must differ: {labels} (name them with FILE:METHOD=LABEL)")
    if reference not in labels:
        raise CompareError(f"--reference {reference!r} is none of the labels {labels}")
    data = {label: read_records(path, method) for label, path, method in parsed}
    benches = sorted(set.intersection(*(set(d) for d in data.values())))
    if not benches:
        raise CompareError("the specs share no benchmark")
    if n_resamples < 1:
        raise CompareError(f"--resamples {n_resamples}: give at least 1")
    rng = np.random.default_rng(seed)
    notes, stats, points, questions = [], {label: {} for label in labels}, {label: {} for label in labels}, {}
    unshared = sorted(set.union(*(set(d) for d in data.values())) - set(benches))
    if unshared:
        notes.append(f"left out, not scored by every spec: {', '.join(unshared)} (the relative scores cover {benches})")
    for bench in benches:
        ids = sorted(set.intersection(*(set(d[bench]) for d in data.values())))
        dropped = len(set.union(*(set(d[bench]) for d in data.values()))) - len(ids)
        if not ids:
            raise CompareError(f"{bench}: the specs share no question")
        if dropped:
            notes.append(f"{bench}: {len(ids)} questions every spec scored; {dropped} scored by some only are left out")
        units = [data[reference][bench][i][0] for i in ids]
        weights = unit_weights(units, n_resamples, rng)
        questions[bench] = len(ids)
        for label in labels:
            scores = np.array([data[label][bench][i][1] for i in ids])
            points[label][bench] = 100.0 * scores.mean()
            stats[label][bench] = 100.0 * (weights @ scores) / weights.sum(axis=1)
    relative, rows = {}, []
    for label in labels:
        if any(points[reference][b] == 0 for b in benches):
            zero = [b for b in benches if points[reference][b] == 0]
            raise CompareError(
                f"the reference {reference!r} scores 0 on {', '.join(zero)}: no relative score is defined"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = [stats[label][b] / stats[reference][b] for b in benches]
            point = [points[label][b] / points[reference][b] for b in benches]
        relative[label] = 100.0 * np.mean(ratios, axis=0)
        rows.append(
            {
                "label": label,
                "scores": {b: points[label][b] for b in benches},
                "intervals": {b: list(percentile_interval(stats[label][b])) for b in benches},
                "relative_score": float(100.0 * np.mean(point)),
                "relative_interval": None if label == reference else list(percentile_interval(relative[label])),
            }
        )
    pairs = []
    for a, b in itertools.combinations(labels, 2):
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
    return {
        "reference": reference,
        "benchmarks": questions,
        "n_resamples": n_resamples,
        "rows": rows,
        "pairs": pairs,
        "notes": notes
        + [
            "scores are 100 x the mean per-question score on the shared questions "
            "(the official aggregate for mean metrics such as VQA accuracy)"
        ],
    }
