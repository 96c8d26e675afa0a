"""Two-stage recipes: `train.previous_stage` names the experiment trained before this one.

The paper trains both LLaVA stages with the schedule active: stage 1 aligns the projector to the layer the
image is injected at, stage 2 finetunes from it. `hidrop train stage2.yaml` therefore runs the stages in
order: a stage that already finished with the same config is skipped, one that was interrupted continues
(as any re-run does), and each next stage starts from the previous one's exported model. Each stage is
its own run folder and MLflow run; the driver marks a finished stage with `FINISHED_FILE`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hidrop.errors import UserError
from hidrop_platform.config.loader import load_config
from hidrop_platform.config.schema import ExperimentConfig

FINISHED_FILE = "hidrop_finished.json"  # in a run folder: the config and step of a training that ran to its end


class RecipeError(UserError, ValueError):
    """The chain of previous stages cannot be followed; one line for the CLI."""


def run_folder(cfg: ExperimentConfig) -> Path:
    """A training's run folder: its checkpoints, export and state, under train.storage_path."""
    return Path(cfg.train.storage_path).resolve() / cfg.name


def export_folder(cfg: ExperimentConfig) -> Path:
    """Where a finished training's model is (what the next stage loads)."""
    return run_folder(cfg) / "export" / "final"


def recipe_stages(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """The stages to train, first to last, ending with `cfg`: each later stage's model.path points at the
    previous stage's export."""
    chain, seen = [cfg], {cfg.name}  # a chain that loops repeats a name: refused below
    while chain[0].train.previous_stage:
        source = chain[0].train.previous_stage
        previous = load_config(source)
        if previous.name in seen:
            raise RecipeError(f"train.previous_stage: {source} ({previous.name!r}) is already a stage of this recipe")
        seen.add(previous.name)
        chain.insert(0, previous)
    stages = [chain[0]]
    for stage in chain[1:]:
        model = stage.model.model_copy(update={"path": str(export_folder(stages[-1]))})
        stages.append(stage.model_copy(update={"model": model}))
    return stages


def finished(cfg: ExperimentConfig) -> bool:
    """Whether this stage already ran to its end with this very config (and its export is there)."""
    marker = run_folder(cfg) / FINISHED_FILE
    if not marker.is_file() or not (export_folder(cfg) / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("config") == cfg.model_dump(mode="json")
    except (OSError, ValueError):
        return False


def mark_finished(cfg: ExperimentConfig, step: int) -> None:
    marker = run_folder(cfg) / FINISHED_FILE
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"step": step, "config": cfg.model_dump(mode="json")}))
    tmp.replace(marker)
