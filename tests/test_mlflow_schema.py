"""What the smallest `hidrop demo` (a sweep with held-out confirmation, a vanilla and a HiDrop training:
the session's `demo` fixture) and a tiny analysis write to MLflow, against a stored snapshot
(tests/snapshots/mlflow_schema.json): every tag, param and metric name per kind of run, and the values
that are deterministic. A rename on the writer's side that the dashboards would not see fails here.

After an intended change of the schema: HIDROP_UPDATE_SNAPSHOT=1 pytest tests/test_mlflow_schema.py,
then review the snapshot's diff."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "snapshots" / "mlflow_schema.json"
# values that change from run to run or machine to machine: only their names are kept
VOLATILE_PARAMS = ("version.", "tracking.", "train.storage_path", "tune.storage_path", "analyze.output")
DETERMINISTIC_METRICS = (
    "avg_vision_tokens",
    "vision_tflops",
    "model_tflops",
    "vision_tflops_per_sample",
    "model_tflops_per_sample",
    "vision_tokens_kept",
    "samples",
    "train_step",
)


def _cli(*args, cwd):
    done = subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", *args, "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]


STAMP = re.compile(r"\d{8}-\d{6}")  # the demo's run names carry their start time


def _kind(run) -> str:
    tags = run.data.tags
    if tags.get("hidrop.kind") == "train":
        return f"train:{run.info.run_name.rsplit('-', 1)[-1]}"  # demo-STAMP-train-vanilla
    if tags.get("hidrop.kind") not in (None, "trial"):
        return tags["hidrop.kind"]
    return f"trial:{run.info.run_name}" if tags.get("hidrop.seed") == "True" else "trial:searched"


def _param(key: str, value: str, tmp: str):
    if key.startswith(VOLATILE_PARAMS) or tmp in value:
        return None
    return STAMP.sub("STAMP", value)


def _describe(client, run, tmp: str) -> dict:
    params = run.data.params
    out = {
        "tags": sorted(k for k in run.data.tags if not k.startswith("mlflow.") or k == "mlflow.parentRunId"),
        "params": {k: _param(k, v, tmp) for k, v in sorted(params.items())},
        "metrics": {
            k: (float(f"{v:.6g}") if k in DETERMINISTIC_METRICS else None) for k, v in sorted(run.data.metrics.items())
        },
        "artifacts": sorted(_artifacts(client, run.info.run_id)),
    }
    return out


def _artifacts(client, run_id: str, path: str = "") -> list[str]:
    found = []
    for a in client.list_artifacts(run_id, path or None):
        found += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return found


def _write_analysis(tmp: Path) -> Path:
    path = tmp / "analyze.yaml"
    analyze = {
        "name": "schema_analyze",
        "model": {"kind": "tiny_llava"},
        "eval": {"benchmarks": [{"name": "easy_vqa", "limit": 8}]},
        "analyze": {"samples": 4, "sweep_samples": 4, "ilvas_k": [3], "ilvas_n": [2], "output": str(tmp / "an")},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    path.write_text(yaml.safe_dump(analyze))
    return path


# the kinds kept in the snapshot; the other seeds (fastv, pdrop, hidrop_tok48/80) write what these do
KINDS = {
    "sweep",
    "trial:seed:vanilla",
    "trial:seed:hidrop_tok64",
    "trial:searched",
    "train:vanilla",
    "train:hidrop",
    "compare",
}


@pytest.mark.slow
def test_what_sweep_training_and_analysis_write_to_mlflow(demo, tmp_path):
    import mlflow

    from hidrop_platform.tracking.store import default_tracking_uri

    _cli("analyze", str(_write_analysis(tmp_path)), cwd=tmp_path)
    seen: dict[str, dict] = {}
    stores = (
        (default_tracking_uri(demo["work"]), str(demo["work"])),
        (f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path)),
    )
    for uri, tmp in stores:
        client = mlflow.MlflowClient(tracking_uri=uri)
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id], max_results=100):
                kind = _kind(run)
                if kind in KINDS or kind == "analyze":
                    assert kind not in seen, kind  # one run of each kind
                    seen[kind] = _describe(client, run, tmp)
    assert set(seen) == KINDS | {"analyze"}, sorted(seen)
    # searched trials sample their schedule: only names are stable
    searched = seen["trial:searched"]
    searched["params"] = dict.fromkeys(searched["params"])
    searched["metrics"] = dict.fromkeys(searched["metrics"])
    if os.environ.get("HIDROP_UPDATE_SNAPSHOT"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    stored = json.loads(SNAPSHOT.read_text())
    for kind in stored:
        for part in ("tags", "params", "metrics", "artifacts"):
            assert seen[kind][part] == stored[kind][part], (kind, part)
