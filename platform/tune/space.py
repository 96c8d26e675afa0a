"""The points of a search as trial configs: a seed's point, the validated config of any point (the
experiment's YAML with a few dotted names overridden, checked exactly like `hidrop eval` checks it), and
why a point is rejected (an impossible schedule, or one over the FLOPs budget in `score` mode)."""

from __future__ import annotations

import re
from typing import Any, Optional

from hidrop.cost import cost_report
from hidrop.schedule import ScheduleSpec
from hidrop_platform.config.loader import validate_config, with_overrides
from hidrop_platform.config.schema import ExperimentConfig


def seed_overrides(seed: Any) -> tuple[str, dict]:
    """(label, overrides) of a seed: a preset name, or a schedule mapping (the whole schedule section)."""
    if isinstance(seed, str):
        return f"seed:{seed}", {"schedule": {"preset": seed}}
    spec = ScheduleSpec.model_validate(seed)
    name = spec.name or spec.preset or "custom"
    return f"seed:{name}", {"schedule": spec.model_dump(mode="json", exclude_none=True)}


def trial_config(base: dict, overrides: dict) -> ExperimentConfig:
    """The validated config of one trial (ConfigError names the problem)."""
    return validate_config(with_overrides(base, overrides), "trial")


def budget_problem(cfg: ExperimentConfig) -> Optional[str]:
    """Why a valid trial is still rejected in `score` mode (over `tune.max_vision_tflops`), else None."""
    budget = cfg.tune.max_vision_tflops
    if cfg.tune.objective != "score" or budget is None:
        return None
    tflops = cost_report(cfg.main_schedule, cfg.model.shape)["vision_tflops"]
    return f"over the vision-TFLOPs budget of {budget:g}" if tflops > budget else None


def rejection_reason(err: Exception) -> str:
    """A rejection reason with the sample's numbers masked, so that one cause is counted once."""
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", str(err).removeprefix("trial: "))
