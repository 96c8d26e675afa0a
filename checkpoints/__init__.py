"""Shipped checkpoints, one folder each: the package data of `hidrop.checkpoints` (hidrop/assets.py finds them).
A regular package so that the editable install can import it too (see pyproject.toml)."""
