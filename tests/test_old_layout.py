"""A sweep saved before platform/ became subpackages still resumes.

Tune pickles classes by module path: the fixture's tuner.pkl names `hidrop_platform.tune.ScheduleSearcher`,
`hidrop_platform.tune.TrialContext`, `hidrop_platform.tune._ProgressCallback` and
`hidrop_platform.config.Dimension`, which the packages keep importable. The fixture is a real sweep of the
flat layout (commit 6d22d13: `hidrop tune` on the YAML inside it, Ctrl+C after three of five trials), with
its MLflow store."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "old_layout_sweep.tar.gz"
# tuner.pkl holds absolute paths (the sweep folder, the store): the sweep must sit where it was written
WHERE = Path("/tmp/hidrop-old-layout-sweep")


def test_the_fixture_pickles_the_old_module_paths():
    with tarfile.open(FIXTURE) as tar:
        pickled = tar.extractfile("hidrop-old-layout-sweep/runs/tiny_tune/tuner.pkl").read()
    assert b"hidrop_platform.tune\x94" in pickled and b"hidrop_platform.tune.driver" not in pickled
    assert b"hidrop_platform.config\x94" in pickled and b"ScheduleSearcher" in pickled
    # ...and each of those names still resolves

    class Names(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("hidrop_platform"):
                seen.append((module, name))
            return super().find_class(module, name)

    seen: list = []
    Names(io.BytesIO(pickled)).load()
    assert {
        ("hidrop_platform.tune", "ScheduleSearcher"),
        ("hidrop_platform.tune", "TrialContext"),
        ("hidrop_platform.tune", "_ProgressCallback"),
        ("hidrop_platform.config", "Dimension"),
    } <= set(seen), seen


@pytest.mark.slow
def test_a_sweep_saved_by_the_flat_layout_resumes(tmp_path):
    shutil.rmtree(WHERE, ignore_errors=True)
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(WHERE.parent, filter="data")
    try:
        done = sorted(p.name for p in (WHERE / "runs" / "tiny_tune" / "trial_runs").glob("*.json"))
        assert len(done) == 3
        proc = subprocess.run(
            [sys.executable, "-m", "hidrop_platform.cli", "tune", "tune.yaml", "--resume", "--json"],
            cwd=WHERE,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
        labels = sorted(t["label"] for t in summary["trials"])
        assert labels == ["seed:vanilla", "trial-001", "trial-002", "trial-003", "trial-004"]
        assert all(t["status"] == "finished" for t in summary["trials"]), summary["trials"]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{WHERE}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("tiny_tune").experiment_id])
        trials = [r for r in runs if r.data.tags.get("hidrop.kind") != "sweep"]
        names = sorted(r.info.run_name for r in trials)
        assert names == sorted(set(names)) and len(names) == 5  # the three finished before were not run again
        for r in trials:
            assert len(client.get_metric_history(r.info.run_id, "relative_score")) == 1
    finally:
        shutil.rmtree(WHERE, ignore_errors=True)
