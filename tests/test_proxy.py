"""`hidrop proxy`: two sweeps over the same space ranked against each other, on constructed sweeps whose
trials log planted per-question records to a real MLflow store (no model: the answers are known)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from hidrop_platform.tune.rank_agreement import ProxyError, compare_sweeps

N_Q = 200


def _write_records(path: Path, method: str, scores) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, s in enumerate(scores):
            f.write(
                json.dumps(
                    {"method": method, "benchmark": "easy_vqa", "id": f"q{i}", "unit": f"q{i}", "score": float(s)}
                )
            )
            f.write("\n")
    return path


def _sweep(root: Path, name: str, uri: str, reference, trials: dict[int, np.ndarray]) -> Path:
    """A finished sweep folder: reference records, and per trial (keyed by inject layer) an MLflow run
    holding its records artifact, as `hidrop tune` leaves them."""
    from mlflow import MlflowClient

    folder = root / name
    (folder / "summary").mkdir(parents=True)
    _write_records(folder / "records.jsonl.gz", "all_tokens", reference)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("proxy") or client.get_experiment(client.create_experiment("proxy"))
    rows = []
    for n, (inject, scores) in enumerate(trials.items()):
        run = client.create_run(exp.experiment_id)
        path = _write_records(root / f"{name}-{n}.jsonl.gz", "curve", scores)
        staged = root / f"{name}-{n}" / "records.jsonl.gz"
        staged.parent.mkdir()
        staged.write_bytes(path.read_bytes())
        client.log_artifact(run.info.run_id, str(staged), "eval")
        client.set_terminated(run.info.run_id)
        rows.append(
            {
                "label": f"trial-{n + 1:03d}",
                "status": "finished",
                "run_id": run.info.run_id,
                "scores": {"easy_vqa": 100 * float(np.mean(scores))},
                "overrides": {"schedule.inject_layer": inject, "schedule.avg_tokens": 23.27},
            }
        )
    rows.append({"label": "trial-999", "status": "failed", "overrides": {"schedule.inject_layer": 99}})
    (folder / "summary" / "sweep.json").write_text(json.dumps({"sweep": name, "trials": rows}))
    (folder / "sweep.json").write_text(json.dumps({"base": {"tracking": {"uri": uri}}}))
    return folder


def _planted(rng, accuracy: float) -> np.ndarray:
    return (rng.random(N_Q) < accuracy).astype(float)


@pytest.fixture
def store(tmp_path):
    return tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_agreeing_and_disagreeing_sweeps(store):
    root, uri = store
    rng = np.random.default_rng(0)
    ref = _planted(rng, 0.8)
    cheap = {1: _planted(rng, 0.3), 5: _planted(rng, 0.5), 9: _planted(rng, 0.7), 12: _planted(rng, 0.45)}
    # the costly side: the same order for three, far apart; inject 12 swaps with inject 5
    costly = {1: _planted(rng, 0.2), 5: _planted(rng, 0.6), 9: _planted(rng, 0.9), 12: _planted(rng, 0.75)}
    a = _sweep(root, "cheap", uri, ref, cheap)
    b = _sweep(root, "costly", uri, ref, costly)
    result = compare_sweeps(str(a), str(b), n_resamples=400)

    keys = [1, 5, 9, 12]
    rel_a = [100 * cheap[k].mean() / ref.mean() for k in keys]
    rel_b = [100 * costly[k].mean() / ref.mean() for k in keys]
    assert result["schedules"] == 4 and result["benchmarks"] == {"easy_vqa": N_Q}
    assert result["spearman"] == pytest.approx(spearmanr(rel_a, rel_b).statistic)
    assert result["kendall"] == pytest.approx(kendalltau(rel_a, rel_b).statistic)
    by_inject = {r["overrides"]["schedule.inject_layer"]: r for r in result["rows"]}
    for k, ra, rb in zip(keys, rel_a, rel_b):
        assert by_inject[k]["scores"] == pytest.approx([ra, rb])
        lo, hi = by_inject[k]["intervals"][1]
        assert lo <= rb <= hi
    lo, hi = result["spearman_interval"]
    assert -1 <= lo <= result["spearman"] <= hi <= 1
    # the cheap side picks inject 9, which is also the costly side's best: no regret
    assert result["pick"]["overrides"]["schedule.inject_layer"] == 9 and result["regret"] == 0.0
    assert result["regret_interval"][0] >= 0.0

    # a reversed costly side: rank correlation -1, the pick is the costly side's worst
    reversed_ = {1: costly[9], 12: costly[12], 5: costly[5], 9: costly[1]}  # cheap order 1 < 12 < 5 < 9
    c = _sweep(root, "reversed", uri, ref, reversed_)
    worst = compare_sweeps(str(a), str(c), n_resamples=200)
    assert worst["spearman"] == pytest.approx(-1.0) and worst["kendall"] == pytest.approx(-1.0)
    assert worst["pick"]["overrides"]["schedule.inject_layer"] == 9
    assert worst["regret"] == pytest.approx(100 * (costly[9].mean() - costly[1].mean()) / ref.mean())

    # a sweep against itself: every resample agrees perfectly
    same = compare_sweeps(str(a), str(a), n_resamples=100)
    assert same["spearman_interval"] == [1.0, 1.0] and same["same_pick_share"] == 1.0


def test_bad_input_is_one_line(store):
    root, uri = store
    rng = np.random.default_rng(1)
    ref = _planted(rng, 0.8)
    a = _sweep(root, "a", uri, ref, {1: _planted(rng, 0.5), 5: _planted(rng, 0.6), 9: _planted(rng, 0.7)})
    b = _sweep(root, "b", uri, ref, {1: _planted(rng, 0.5), 3: _planted(rng, 0.6), 9: _planted(rng, 0.7)})
    with pytest.raises(ProxyError, match="2 schedules finished in both sweeps"):
        compare_sweeps(str(a), str(b))
    with pytest.raises(ProxyError, match="no finished sweep there"):
        compare_sweeps(str(root / "missing"), str(a))
    with pytest.raises(ProxyError, match="no MLflow store"):
        compare_sweeps(str(a), str(a), tracking_uri=f"sqlite:///{root / 'elsewhere.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", "proxy", str(a), str(b)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert "a ranking needs at least 3" in done.stderr + done.stdout


def test_a_label_from_the_summary_never_steers_where_records_are_downloaded(store):
    """Sweep folders may be shared: a label like ../../x must not make the proxy write outside its temp
    folder (it is only shown)."""
    root, uri = store
    rng = np.random.default_rng(2)
    ref = _planted(rng, 0.8)
    trials = {1: _planted(rng, 0.5), 5: _planted(rng, 0.6), 9: _planted(rng, 0.7)}
    a = _sweep(root, "a", uri, ref, trials)
    summary = json.loads((a / "summary" / "sweep.json").read_text())
    escape = "../" * 40 + str(root / "escaped").lstrip("/")  # enough '..' to reach / from any temp folder
    summary["trials"][0]["label"] = escape
    (a / "summary" / "sweep.json").write_text(json.dumps(summary))
    result = compare_sweeps(str(a), str(a), n_resamples=10)
    assert result["schedules"] == 3 and any(escape in r["labels"] for r in result["rows"])
    assert not (root / "escaped").exists()
