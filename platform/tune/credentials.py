"""MLflow basic auth for a sweep's trials, held by a named Ray actor beside the driver and fetched by each
trial. Never on disk: Tune pickles the trial context into the sweep folder, and Ray logs a runtime env's
variables in plain text; the context carries only the actor's name."""

from __future__ import annotations

import os
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class _CredentialHolder:
    """The actor's class: the credentials in memory, handed out on request."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, values: dict[str, str]) -> None:  # a call, not a constructor argument: GCS keeps actor specs
        self.values = dict(values)

    def get(self) -> dict[str, str]:
        return dict(self.values)


def share_credentials(credentials: dict[str, str]) -> tuple[Optional[str], Any]:
    """(name, handle) of a named actor holding `credentials` for this sweep's trials; (None, None) when
    there are none. The actor ends when the handle is dropped: keep it while trials run."""
    if not credentials:
        return None, None
    name = f"hidrop-credentials-{os.urandom(8).hex()}"  # concurrent sweeps on one cluster each have their own
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # lives with us
    handle = ray.remote(num_cpus=0)(_CredentialHolder).options(name=name, scheduling_strategy=here).remote()
    ray.get(handle.put.remote(credentials))
    return name, handle


def fetch_credentials(name: Optional[str]) -> dict[str, str]:
    """The credentials a trial sets in its own environment (none when the sweep has none)."""
    if not name:
        return {}
    return ray.get(ray.get_actor(name).get.remote())
