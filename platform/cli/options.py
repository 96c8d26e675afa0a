"""What the commands share in reading their arguments: the experiment YAML with its overrides, a
--tracking-uri without its credentials, the --json flag, and the error for options that cannot work."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from hidrop.errors import UserError
from hidrop_platform.config.credentials import move_credentials_to_env
from hidrop_platform.config.loader import load_config_data, validate_config
from hidrop_platform.config.schema import ExperimentConfig


class OptionError(UserError, ValueError):
    """Options the command cannot work with (a bad value, two that contradict each other, a folder it
    cannot write), found before any work starts."""


AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def load_experiment(path: str, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    return load_experiment_and_data(path, overrides)[0]


def load_experiment_and_data(path: str, overrides: Optional[List[str]] = None) -> tuple[ExperimentConfig, dict]:
    """(validated config, raw YAML mapping with the overrides): searches rebuild trial configs from the raw one."""
    base = load_config_data(path, overrides or [])
    return validate_config(base, path), base


def without_credentials(uri: Optional[str]) -> Optional[str]:
    """A --tracking-uri without its credentials (moved into the environment, where MLflow reads them)."""
    return move_credentials_to_env(uri) if uri else uri
