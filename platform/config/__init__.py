"""Experiment configuration: `schema` (the pydantic models of an experiment YAML, the `train:` section in
`training`), `loader` (reading a YAML with overrides, the dotted-name view) and `credentials` (MLflow basic
auth moved out of URIs into the environment)."""

# sweeps saved before the config moved here pickled this class under `hidrop_platform.config`
from hidrop_platform.config.schema import Dimension  # noqa: F401
