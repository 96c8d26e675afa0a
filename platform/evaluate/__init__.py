"""Evaluation runs on the driver: `hidrop eval`, `compare` and `analyze`."""
