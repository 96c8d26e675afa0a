"""Shipped experiment YAMLs: the package data of `hidrop.experiments` (hidrop/assets.py finds them).
A regular package so that the editable install can import it too (see pyproject.toml)."""
