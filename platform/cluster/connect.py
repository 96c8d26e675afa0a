"""Connecting to Ray, and the checks a cluster user needs before anything waits on it.

Ray itself answers several cluster mistakes by waiting forever (a request no single node can hold, an
unreachable GCS address) or with a traceback (a dashboard address where a GCS address belongs). Every
command that starts Ray comes through `start_ray`, and every resource request through `check_fits`, so
these become one line naming the problem before any run is created.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Optional

from hidrop.errors import UserError
from hidrop_platform.storage import write_problem

# Ray sets this in the environment of a job's driver (`ray job submit`): the job's config, runtime env included
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# an autoscaling cluster may add the node a request needs: skip the check against the nodes alive now
SKIP_CHECK_ENV = "HIDROP_SKIP_RESOURCE_CHECK"
# Ray Train's actor that watches for node draining (spot preemption), one per training
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class ClusterSetupError(UserError, RuntimeError):
    """Ray cannot be reached, or a request can never be placed; one line for the CLI."""


def job_runtime_env() -> Optional[dict]:
    """The runtime env of the Ray job this driver runs in, or None outside a job."""

    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def job_working_dir() -> Optional[Path]:
    """The job's unpacked `--working-dir` (the driver's working directory), which Ray deletes with the
    job; None outside a job or for a job without one."""

    env = job_runtime_env()
    return Path.cwd().resolve() if env and env.get("working_dir") else None


def check_job_paths(named_paths: dict[str, str], tracking_uri: Optional[str], tracking_enabled: bool) -> None:
    """Refuse output folders that cannot be written, before anything runs (the tracking URI itself is
    `tracking.check_tracking_uri`'s). As a Ray job with a working_dir, relative paths land in Ray's
    unpacked copy of it and vanish with the job: refuse them, and the default local MLflow store, naming
    the setting to change."""

    where = job_working_dir()
    for name, value in named_paths.items():
        if "://" in str(value):  # the driver and the workers read run folders as local paths
            raise ClusterSetupError(
                f"{name}={value!r}: storage URIs are not supported; mount the storage on every node "
                "and give its path (e.g. /mnt/shared/runs)"
            )
        if where is not None and not Path(value).is_absolute():
            raise ClusterSetupError(
                f"{name}={value!r} is relative: as a Ray job it would resolve inside the job's unpacked "
                f"working_dir ({where}), which Ray deletes after the job; give an absolute path on storage "
                f"every node shares (e.g. {name}=/shared/hidrop/{Path(value).name})"
            )
        problem = write_problem(value)
        if problem is not None:
            raise ClusterSetupError(f"{name}={value}: {problem}")
    if not tracking_enabled:
        return
    if tracking_uri is None:
        if where is not None:
            raise ClusterSetupError(
                f"tracking.uri is unset: as a Ray job the local MLflow store ./mlruns would be created inside "
                f"the job's unpacked working_dir ({where}), which Ray deletes after the job; set tracking.uri to "
                "an MLflow server (tracking.uri=http://host:5000) or an absolute sqlite path"
            )
        return


def _gcs_endpoint(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a GCS or Ray Client address, None for `auto`/`local` (Ray resolves those)."""

    rest = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_address(address: Optional[str], field: str = "ray_address") -> Optional[str]:
    """The Ray address to connect to (the argument, else RAY_ADDRESS), refused in one line when it is a
    dashboard URL or nothing listens there; Ray would raise a traceback or retry for minutes."""

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    origin = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else field
    if address.startswith(("http://", "https://")):
        raise ClusterSetupError(
            f"{origin}={address} is a dashboard (job submission) address; hidrop connects to the cluster's "
            "GCS address (head:6379, or 'auto' on a node); to run on the cluster as a job use "
            "platform/cluster/submit.sh, which takes the dashboard address"
        )
    endpoint = _gcs_endpoint(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=5).close()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ClusterSetupError(f"cannot reach the Ray cluster at {address} ({origin}): {reason}") from None
    return address


def start_ray(address: Optional[str] = None, field: str = "ray_address") -> None:
    """Connect to `address` (else RAY_ADDRESS; `field` names the setting in messages), or start a local
    Ray, once per process. Worker output
    stays in Ray's log files (/tmp/ray/session_latest/logs): the driver shows progress bars, and --json
    prints only JSON."""

    import ray

    address = check_address(address, field)  # refused even where this process already runs Ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's boxed banner ignores verbose=0
    if address is None:
        # a Ray started here has no autoscaler to drain (preempt) its node: Ray Train's preemption watcher
        # would only cost every training an actor process. Set before ray.init: Tune trials inherit it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": worker_env()},
    )
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)


def stop_ray() -> None:
    """After an interruption: ignore Ctrl+C from here on (main thread only; the command only reports
    and exits) and shut this process's Ray down. A second Ctrl+C during Ray's own shutdown would print a
    traceback and leave half-stopped Ray processes."""

    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if ray.is_initialized():
        gc.collect()  # Ray handles freed after the shutdown would make Ray end the process (status 1)
        ray.shutdown()


def worker_env() -> dict:
    """What every worker needs in its environment. Inside a job, the keys the job's runtime env already
    sets are left out: Ray refuses to merge a driver's env_vars with the job's when any key repeats."""

    env = {"HF_HUB_OFFLINE": "1"}
    for key in ("HIDROP_CACHE", "TORCH_EXTENSIONS_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    job_env = (job_runtime_env() or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_env}


# ---- will a request ever be placed? --------------------------------------------------------------
def alive_nodes() -> list[dict[str, float]]:
    """The resources of each alive node of the connected cluster."""

    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def fits_per_node(request: dict[str, float], nodes: list[dict[str, float]]) -> list[int]:
    """How many copies of `request` (one bundle: all on one node) each node holds."""

    wanted = {k: float(v) for k, v in request.items() if float(v) > 0}
    counts = []
    for node in nodes:
        counts.append(min((int(float(node.get(k, 0)) // v) for k, v in wanted.items()), default=0))
    return counts


def check_fits(what: str, request: dict[str, float], copies: int, nodes: list[dict[str, float]]) -> int:
    """Refuse a request that the cluster can never place: `copies` bundles of `request`, each on a single
    node. Returns how many copies fit at once. Ray would wait forever for such a request."""

    counts = fits_per_node(request, nodes)
    if os.environ.get(SKIP_CHECK_ENV) == "1":  # what fits now, or what was asked for: more nodes may come
        return max(sum(counts), copies, 1)
    largest = max(nodes, key=lambda n: tuple(float(n.get(k, 0)) for k in sorted(request)), default={})
    shown = {k: float(largest.get(k, 0)) for k in request}
    if not any(counts):
        raise ClusterSetupError(
            f"{what} asks for {_describe(request)} on one node, but no node has that: the largest offers "
            f"{_describe(shown)} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}); lower the request or add "
            f"a bigger node (an autoscaling cluster: set {SKIP_CHECK_ENV}=1)"
        )
    if sum(counts) < copies:
        raise ClusterSetupError(
            f"{what} needs {copies} x {{{_describe(request)}}}, each on one node, but the cluster's "
            f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} hold{'s' if len(nodes) == 1 else ''} only "
            f"{sum(counts)}; lower the request or the number of workers (an autoscaling cluster: set "
            f"{SKIP_CHECK_ENV}=1)"
        )
    return sum(counts)
