"""Experiment configuration: the pydantic schema of an experiment YAML, its loading and overrides."""

# sweeps saved before the config moved here pickled this class under `hidrop_platform.config`
from hidrop_platform.config.schema import Dimension  # noqa: F401
