"""Two-stage recipes (train.previous_stage): the chain of stages, skipping a finished stage, and both
stages trained from one command with the schedule active."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hidrop_platform.config.loader import load_config
from hidrop_platform.train.recipe import (
    FINISHED_FILE,
    RecipeError,
    export_folder,
    finished,
    mark_finished,
    recipe_stages,
)

SCHEDULE = {"preset": "hidrop_tok64", "query_rule": "multi_round"}


def _stage(folder: Path, name: str, stage: str, previous: str | None = None, steps: int = 2) -> Path:
    train = {
        "stage": stage,
        "data": [{"name": "easy_vqa", "limit": 16}],
        "micro_batch_size": 4,
        "max_steps": steps,
        "lr": 3e-3,
        "lr_schedule": "constant",
        "warmup_ratio": 0.0,
        "num_workers": 1,
        "checkpoint_every": steps,
        "storage_path": str(folder / "runs"),
    }
    if previous:
        train["previous_stage"] = previous
    path = folder / f"{name}.yaml"
    data = {"name": name, "model": {"kind": "tiny_llava"}, "schedule": SCHEDULE, "train": train}
    data["tracking"] = {"uri": f"sqlite:///{folder / 'mlflow.db'}"}
    path.write_text(yaml.safe_dump(data))
    return path


def test_stages_chain_in_order_each_from_the_previous_export(tmp_path):
    first = _stage(tmp_path, "align", "pretrain")
    second = _stage(tmp_path, "tune", "finetune", previous=str(first))
    third = _stage(tmp_path, "more", "finetune", previous=str(second))
    stages = recipe_stages(load_config(third))
    assert [s.name for s in stages] == ["align", "tune", "more"]
    assert stages[0].model.path is None  # the first stage starts where its own YAML says
    assert stages[1].model.path == str(export_folder(stages[0]))
    assert stages[2].model.path == str(export_folder(stages[1]))
    assert stages[1].train.stage == "finetune" and stages[0].train.stage == "pretrain"


def test_a_loop_or_a_missing_stage_is_one_line(tmp_path):
    a = tmp_path / "a.yaml"
    _stage(tmp_path, "a", "pretrain", previous=str(tmp_path / "b.yaml"))
    _stage(tmp_path, "b", "pretrain", previous=str(a))
    with pytest.raises(RecipeError, match="already a stage of this recipe"):
        recipe_stages(load_config(a))
    lone = _stage(tmp_path, "c", "finetune", previous=str(tmp_path / "nowhere.yaml"))
    with pytest.raises(Exception, match="nowhere"):
        recipe_stages(load_config(lone))


def test_finished_means_the_same_config_ran_to_its_end(tmp_path):
    cfg = load_config(_stage(tmp_path, "align", "pretrain"))
    assert not finished(cfg)
    export_folder(cfg).mkdir(parents=True)
    (export_folder(cfg) / "config.json").write_text("{}")
    mark_finished(cfg, 2)
    assert finished(cfg) and json.loads((export_folder(cfg).parents[1] / FINISHED_FILE).read_text())["step"] == 2
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})})
    assert not finished(longer)  # a changed config trains (continues) again


def test_the_cli_runs_unfinished_stages_in_order_and_skips_finished_ones(tmp_path, monkeypatch):
    from hidrop_platform.cli import app, run

    first = _stage(tmp_path, "align", "pretrain")
    second = _stage(tmp_path, "tune", "finetune", previous=str(first))
    calls = []

    def fake(cfg, as_json, restart, force):
        calls.append((cfg.name, cfg.model.path, restart))
        export_folder(cfg).mkdir(parents=True, exist_ok=True)
        (export_folder(cfg) / "config.json").write_text("{}")
        mark_finished(cfg, cfg.train.max_steps)
        return {
            "experiment": cfg.name,
            "wall_time_s": 0.0,
            "metrics": {"loss": 1.0, "step": 2},
            "checkpoint": None,
            "export": str(export_folder(cfg)),
            "tracking_uri": None,
            "continued": False,
            "orphaned_checkpoints_removed": [],
        }

    monkeypatch.setattr(run, "_train_stage", fake)
    result = CliRunner().invoke(app, ["train", str(second), "--json", "--restart"])
    assert result.exit_code == 0, result.output
    align_export = str(export_folder(load_config(first)))
    assert calls == [("align", None, False), ("tune", align_export, True)]  # --restart: the named stage only
    assert [s["experiment"] for s in json.loads(result.stdout)["stages"]] == ["align", "tune"]
    calls.clear()
    again = CliRunner().invoke(app, ["train", str(second)])
    assert again.exit_code == 0, again.output
    assert calls == [("tune", align_export, False)] and "align: already trained" in again.output


@pytest.mark.slow
def test_one_command_trains_both_stages_with_the_schedule_active(tmp_path, monkeypatch):
    """Stage 1 (projector) then stage 2 (from stage 1's export), HiDrop active in both, one MLflow run each."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from hidrop_platform.cli import app

    monkeypatch.chdir(tmp_path)
    first = _stage(tmp_path, "align", "pretrain")
    second = _stage(tmp_path, "tune", "finetune", previous=str(first))
    result = CliRunner().invoke(app, ["train", str(second), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert [s["experiment"] for s in out["stages"]] == ["align", "tune"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert set(runs) == {"align", "tune"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert (
        runs["align"].data.params["train.stage"] == "pretrain" and runs["tune"].data.params["train.stage"] == "finetune"
    )
    assert runs["tune"].data.params["model.path"] == str(export_folder(load_config(first)))
    assert runs["align"].data.params["schedule.name"] == runs["tune"].data.params["schedule.name"]
    # stage 2 loaded stage 1's export (model.path above) and trained on from it: its projector moved on
    aligned = load_file(str(export_folder(load_config(first)) / "model.safetensors"))
    tuned = load_file(str(Path(out["export"]) / "model.safetensors"))
    projector = [k for k in aligned if "projector" in k]
    assert projector and any(not torch.equal(aligned[k], tuned[k]) for k in projector)
