"""`hidrop proxy`: does a cheap search rank schedules the way an expensive one does?

A training-free sweep on an all-tokens model costs minutes; a trained sweep (each schedule finetuned with
the schedule active) costs hours. The cheap one is a valid proxy for the expensive one only if it ranks
the same schedules in the same order. This module pairs two finished sweeps over the same points of a
search space (trials matched by their overrides), reads every matched trial's per-question records back
from MLflow (each trial logs eval/records.jsonl.gz), and reports:

- Spearman's rho and Kendall's tau of the two sides' relative scores, each with a 95% interval from a
  bootstrap over the questions: both sides and every trial are resampled with the same draws (the sweeps
  asked the same questions), so the interval says how much of the agreement the question sample can
  carry. It is not an interval over the choice of schedules; with six schedules that would be wider.
- the pick: the cheap side's best trial, its expensive-side score, and the regret (the expensive side's
  best minus the pick's score there, paired interval); how often the picks coincide under resampling.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.stats import kendalltau, rankdata, spearmanr

from hidrop.errors import UserError
from hidrop.evaluation.registry import relative_benchmarks
from hidrop.evaluation.uncertainty import N_RESAMPLES, percentile_interval, unit_weights
from hidrop_platform.evaluate.compare import CompareError, read_records
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    TrackingUnavailable,
    check_readable,
    default_tracking_uri,
    download_artifact,
    redact_uri,
)

MIN_MATCHED = 3  # fewer schedules leave no ranking to compare


class ProxyError(UserError, ValueError):
    """Sweeps that cannot be paired; one line for the user."""


def sweep_folder(given: str, storage: str = "runs/tune") -> Path:
    """A sweep's folder: the path given, else the sweep of that name under `storage`."""
    for candidate in (Path(given), Path(storage) / given):
        if (candidate / "summary" / "sweep.json").is_file():
            return candidate
    raise ProxyError(f"{given}: no finished sweep there (no summary/sweep.json; run hidrop tune first)")


def _summary(folder: Path) -> tuple[dict, Optional[str]]:
    summary = json.loads((folder / "summary" / "sweep.json").read_text())
    base = {}
    if (folder / "sweep.json").is_file():
        base = json.loads((folder / "sweep.json").read_text()).get("base") or {}
    return summary, (base.get("tracking") or {}).get("uri")


def _records(path: Path, method: Optional[str] = None) -> dict[str, dict[str, tuple]]:
    """benchmark -> question id -> (unit, score, family) of `method` (default: the file's only method)."""
    try:
        return read_records(path, method).questions
    except CompareError as e:
        raise ProxyError(str(e)) from None


def _key(overrides: dict) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)


def _side(folder: Path, tracking_uri: Optional[str], tmp: Path) -> dict:  # tmp: this side's own folder
    """A sweep's finished trials (key -> label, overrides, records) and its all-tokens reference records."""
    summary, own_uri = _summary(folder)
    uri = tracking_uri or own_uri or default_tracking_uri()
    reference_file = folder / N.RECORDS_FILE
    if not reference_file.is_file():
        raise ProxyError(f"{folder}: no {N.RECORDS_FILE} (the sweep's reference records)")
    trials = {}
    finished = [t for t in summary["trials"] if t.get("status") == N.FINISHED and t.get("run_id") and t.get("scores")]
    if finished:
        try:
            check_readable(uri)
        except TrackingUnavailable as e:
            raise ProxyError(str(e)) from None
    for i, t in enumerate(finished):
        dst = tmp / str(i)  # never the label: it comes from a file in a shared folder and could hold '../'
        dst.mkdir(parents=True)
        try:
            local = download_artifact(uri, t["run_id"], f"{N.RECORDS_DIR}/{N.RECORDS_FILE}", dst)
        except Exception as e:  # an MlflowException or OSError: the run or its artifact is gone
            raise ProxyError(
                f"{folder.name} {t['label']}: cannot read its records from {redact_uri(uri)}: {str(e)[:160]}"
            ) from None
        trials[_key(t.get("overrides") or {})] = {
            "label": t["label"],
            "overrides": t.get("overrides") or {},
            "records": _records(Path(local)),
        }
    return {
        "name": summary.get("sweep") or folder.name,
        "trials": trials,
        "reference": _records(reference_file, "all_tokens"),
    }


def _ranks_corr(scores: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample (rows), Spearman's rho and Kendall's tau between two (resamples, schedules) arrays."""
    rho, tau = np.empty(len(scores)), np.empty(len(scores))
    with warnings.catch_warnings():  # a resample where one side ties everywhere has no correlation: NaN, dropped
        warnings.simplefilter("ignore")
        for i, (a, b) in enumerate(zip(scores, other)):
            rho[i] = spearmanr(a, b).statistic
            tau[i] = kendalltau(a, b).statistic
    return rho, tau


def _relative_scores(
    sides: list[dict], shared: list[str], benches: list[str], n_resamples: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], dict[str, int], list[str]]:
    """Per side, the (resamples + 1, schedules) relative scores of the `shared` trials (row 0 is the point
    estimate), on the questions both sweeps scored for every schedule; the question count per benchmark,
    and notes on the questions left out. Both sides and every trial are resampled with the same draws."""
    notes = []
    relative = [np.zeros((n_resamples + 1, len(shared))) for _ in sides]
    questions = {}
    for bench in benches:
        tables = [s["reference"].get(bench, {}) for s in sides] + [
            s["trials"][k]["records"][bench] for s in sides for k in shared
        ]
        ids = sorted(set.intersection(*(set(t) for t in tables)))
        if not ids:
            raise ProxyError(f"{bench}: the two sweeps share no question")
        dropped = len(set.union(*(set(t) for t in tables))) - len(ids)
        if dropped:
            notes.append(
                f"{bench}: {len(ids)} questions both sweeps scored for every schedule; {dropped} others left out"
            )
        questions[bench] = len(ids)
        weights = np.vstack([np.ones(len(ids)), unit_weights([tables[0][i][0] for i in ids], n_resamples, rng)])
        for s_i, side in enumerate(sides):
            ref = weights @ np.array([side["reference"][bench][i][1] for i in ids])
            for j, k in enumerate(shared):
                got = weights @ np.array([side["trials"][k]["records"][bench][i][1] for i in ids])
                with np.errstate(divide="ignore", invalid="ignore"):
                    relative[s_i][:, j] += 100.0 * got / ref / len(benches)
    return relative, questions, notes


def compare_sweeps(
    cheap: str,
    costly: str,
    tracking_uri: Optional[str] = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    storage: str = "runs/tune",
) -> dict:
    """The rank agreement of two sweeps over the same space (see the module docstring), JSON-ready."""
    if n_resamples < 1:
        raise ProxyError(f"--resamples {n_resamples}: give at least 1")
    folders = [sweep_folder(cheap, storage), sweep_folder(costly, storage)]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial is noise
        sides = [_side(f, tracking_uri, Path(tmp) / str(i)) for i, f in enumerate(folders)]
    shared = [k for k in sides[0]["trials"] if k in sides[1]["trials"]]
    if len(shared) < MIN_MATCHED:
        raise ProxyError(
            f"{len(shared)} schedules finished in both sweeps (matched by their overrides); "
            f"a ranking needs at least {MIN_MATCHED}"
        )
    benches = sorted(set.intersection(*(set(s["trials"][k]["records"]) for s in sides for k in shared)))
    benches = relative_benchmarks(benches)
    if not benches:
        raise ProxyError("the matched trials share no benchmark")
    relative, questions, notes = _relative_scores(sides, shared, benches, n_resamples, np.random.default_rng(seed))
    point_a, point_b = relative[0][0], relative[1][0]
    rho, tau = _ranks_corr(relative[0][1:], relative[1][1:])
    pick = int(np.argmax(point_a))
    best = int(np.argmax(point_b))
    regret = relative[1][1:].max(axis=1) - relative[1][1:, pick]
    agree = float(np.mean(np.argmax(relative[0][1:], axis=1) == np.argmax(relative[1][1:], axis=1)))
    ranks_a, ranks_b = rankdata(-point_a, method="min"), rankdata(-point_b, method="min")
    rows = []
    for j, k in enumerate(shared):
        rows.append(
            {
                "overrides": sides[0]["trials"][k]["overrides"],
                "labels": [s["trials"][k]["label"] for s in sides],
                "scores": [float(point_a[j]), float(point_b[j])],
                "intervals": [list(percentile_interval(r[1:, j])) for r in relative],
                "ranks": [int(ranks_a[j]), int(ranks_b[j])],
            }
        )
    pick_row, best_row = rows[pick], rows[best]
    rows.sort(key=lambda r: r["ranks"][1])
    return {
        "sweeps": [s["name"] for s in sides],
        "schedules": len(shared),
        "unmatched": [len(s["trials"]) - len(shared) for s in sides],
        "benchmarks": questions,
        "n_resamples": n_resamples,
        "spearman": float(spearmanr(point_a, point_b).statistic),
        "spearman_interval": list(percentile_interval(rho)),
        "kendall": float(kendalltau(point_a, point_b).statistic),
        "kendall_interval": list(percentile_interval(tau)),
        "pick": pick_row,
        "best": best_row,
        "regret": float(point_b[best] - point_b[pick]),
        "regret_interval": list(percentile_interval(regret)),
        "same_pick_share": agree,
        "rows": rows,
        "notes": notes,
    }
