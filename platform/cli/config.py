"""`hidrop validate` and `hidrop flops`: read experiment files and print what their schedules cost,
without loading a model."""

from __future__ import annotations

from typing import List, Optional

import typer

import hidrop_platform.cli.views as views
from hidrop.cost import cost_report
from hidrop_platform.cli.options import AsJson, load_experiment


def validate(
    experiment: str = typer.Argument(..., help="experiment YAML"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides"),
    as_json: bool = typer.Option(False, "--json", help="print the resolved config as JSON"),
):
    """Load and validate an experiment; print the resolved config, token plan, avg tokens and TFLOPs."""
    cfg = load_experiment(experiment, overrides)
    reports = [cost_report(s, cfg.model.shape) for s in cfg.schedules()]
    if as_json:
        views.print_json({"config": cfg.model_dump(mode="json"), "schedules": reports})
        return
    views.print_validation(experiment, cfg, reports)


def flops(
    experiments: List[str] = typer.Argument(..., help="one or more experiment YAMLs"),
    as_json: AsJson = False,
):
    """Cost accounting for each experiment's model shape and schedule(s)."""
    rows = []
    for path in experiments:
        cfg = load_experiment(path)
        for s in cfg.schedules():
            rows.append({"experiment": cfg.name, "file": path, **cost_report(s, cfg.model.shape)})
    if as_json:
        views.print_json({"schedules": rows})
        return
    views.print_costs(rows)
