"""What a tiny sweep, a tiny training run and a tiny analysis write to MLflow, against a stored snapshot
(tests/snapshots/mlflow_schema.json): every tag, param and metric name per kind of run, and the values
that are deterministic. A rename on the writer's side that the dashboards would not see fails here.

After an intended change of the schema: HIDROP_UPDATE_SNAPSHOT=1 pytest tests/test_mlflow_schema.py,
then review the snapshot's diff."""

import json
import os
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


def _kind(run) -> str:
    tags = run.data.tags
    if tags.get("hidrop.kind") not in (None, "trial"):
        return tags["hidrop.kind"]
    return f"trial:{run.info.run_name}" if tags.get("hidrop.seed") == "True" else "trial:searched"


def _describe(client, run, tmp: str) -> dict:
    params = run.data.params
    out = {
        "tags": sorted(k for k in run.data.tags if not k.startswith("mlflow.") or k == "mlflow.parentRunId"),
        "params": {k: (None if k.startswith(VOLATILE_PARAMS) or tmp in v else v) for k, v in sorted(params.items())},
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


def _write_experiments(tmp: Path) -> dict[str, Path]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    tune = {
        "name": "schema_tune",
        "model": {"kind": "tiny_llava"},
        "schedule": {"inject_layer": 2, "exit_layer": 7, "stages": 2, "first_keep_ratio": 0.5},
        "eval": {"benchmarks": [{"name": "easy_vqa", "limit": 8}], "baselines": [], "batch_size": 8},
        "tracking": {"uri": uri},
        "tune": {
            "algorithm": "random",
            "num_samples": 1,
            "seeds": ["vanilla", "hidrop_tok64"],
            "storage_path": str(tmp / "tune"),
            "space": {
                "schedule.inject_layer": {"int": [1, 6]},
                "schedule.exit_layer": {"int": [3, 8]},
                "schedule.stages": {"int": [1, 3]},
                "schedule.first_keep_ratio": {"float": [0.1, 0.9]},
            },
        },
    }
    train = yaml.safe_load((ROOT / "experiments" / "tiny_train_smoke.yaml").read_text())
    train["name"] = "schema_train"
    train["train"].update(
        max_steps=2, num_workers=1, checkpoint_every=2, storage_path=str(tmp / "train"), eval_after=True
    )
    train["eval"] = {"benchmarks": [{"name": "easy_vqa", "limit": 8}], "baselines": ["all_tokens"]}
    train["tracking"] = {"uri": uri}
    analyze = {
        "name": "schema_analyze",
        "model": {"kind": "tiny_llava"},
        "eval": {"benchmarks": [{"name": "easy_vqa", "limit": 8}]},
        "analyze": {"samples": 4, "sweep_samples": 4, "ilvas_k": [3], "ilvas_n": [2], "output": str(tmp / "an")},
        "tracking": {"uri": uri},
    }
    paths = {}
    for name, data in (("tune", tune), ("train", train), ("analyze", analyze)):
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(data))
    return paths


@pytest.mark.slow
def test_what_sweep_training_and_analysis_write_to_mlflow(tmp_path):
    import mlflow

    paths = _write_experiments(tmp_path)
    for command, path in paths.items():
        _cli(command, str(path), cwd=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    seen: dict[str, dict] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=100):
            described = _describe(client, run, str(tmp_path))
            kind = _kind(run)
            assert kind not in seen, kind  # one run of each kind
            seen[kind] = described
    assert set(seen) == {
        "sweep",
        "trial:seed:vanilla",
        "trial:seed:hidrop_tok64",
        "trial:searched",
        "train",
        "analyze",
    }, sorted(seen)
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
