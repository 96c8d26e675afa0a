"""`hidrop ui`'s server: `mlflow ui` over a local store, started, waited for and stopped with its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hidrop_platform.tracking.store import DEFAULT_TRACKING_DIR, TrackingUnavailable, check_readable, sqlite_path

# MLflow 3's UI opens on its GenAI pages; this query opens the model-training view (runs, metrics)
UI_TRAINING_VIEW = "?workflowType=machine_learning"


def serve_ui(
    tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, ready_timeout: float = 120.0
) -> subprocess.Popen:
    """Start `mlflow ui` over `tracking_uri` and return once it answers; the caller waits on the process.
    Raises TrackingUnavailable for a missing store, a port in use, or a server that dies while starting."""
    import requests  # with mlflow's dependencies

    check_readable(tracking_uri)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise TrackingUnavailable(
                f"cannot listen on {host}:{port} ({err.strerror or err}); pick another port with --port"
            ) from None
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    db = sqlite_path(tracking_uri)
    log = (db.parent if db else Path(DEFAULT_TRACKING_DIR)) / "ui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # no background job runner (it serves GenAI judges and starts a handful of worker processes)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = ui_base_url(host, port)
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                raise TrackingUnavailable(
                    f"the MLflow UI exited while starting: {lines[-1] if lines else process.returncode} (log: {log})"
                )
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    return process
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TrackingUnavailable(f"the MLflow UI did not answer at {url} within {ready_timeout:.0f} s (log: {log})")
    except BaseException:  # Ctrl+C while starting too: it runs in its own session, so stop it here
        stop_ui(process)
        raise


def ui_base_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def stop_ui(process: subprocess.Popen) -> None:
    """Stop the UI server and its workers (they share its process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
