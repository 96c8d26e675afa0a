"""MLflow tracking that never loses data: one resumable run per `Tracker`, spooled to disk while offline.

This is the only module of the project that imports mlflow, and it does so lazily (inside functions), so
`import hidrop_platform.tracking` stays cheap for code paths that never log (CLI help, non-zero ranks).

Local default store: sqlite under `./mlruns` (`default_tracking_uri()`), artifacts in `./mlruns/artifacts`.
The driver calls `prepare()` once before workers start, because concurrent processes creating a new
sqlite database race on its schema migration. A remote store is an MLflow server, `http://host:port`.

Offline behaviour: a call that fails because the store cannot be reached is appended as one JSON line to
a spool file (the first line names the run) and a single warning says so. Later calls replay the spool
first, in order, into the same run; metrics keep their original step and timestamp. A spool left behind
(the server never came back) is replayed later with `sync_spool(path)`.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from hidrop_platform import mlflow_names as N

if TYPE_CHECKING:  # only for annotations: the config module pulls in the schedule code
    import subprocess

    from hidrop_platform.config import ExperimentConfig

DEFAULT_TRACKING_DIR = "mlruns"
DB_FILE = "mlflow.db"
# MLflow 3's UI opens on its GenAI pages; this query opens the model-training view (runs, metrics)
UI_TRAINING_VIEW = "?workflowType=machine_learning"
SPOOL_VERSION = 1

# mlflow's own limits (mlflow.utils.validation), repeated here so that importing this module stays cheap
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

PROBE_TIMEOUT_S = 3.0
# mlflow retries a failed request 7 times with exponential backoff by default (minutes of stalling while a
# server is down); the spool is our retry mechanism, so mlflow only needs to ride out a short blip.
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message is one line naming the URI."""


class TrackingWarning(UserWarning):
    """Tracking went offline, came back, or left data on disk."""


# ---------------------------------------------------------------------------------------------- URIs


def default_tracking_uri(root: str | Path = ".") -> str:
    """`sqlite:///ABS/mlruns/mlflow.db` under `root` (the working directory by default)."""
    return f"sqlite:///{(Path(root).resolve() / DEFAULT_TRACKING_DIR / DB_FILE).as_posix()}"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact_uri(uri: str) -> str:
    """Drop `user:password@` from a URI before it goes into a message."""
    return re.sub(r"^(\w+://)[^/@]+@", r"\1", uri)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _default_artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Local stores keep artifacts next to the database; servers choose their own location."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    # mlflow's own default would be ./mlruns relative to whatever the working directory happens to be
    return (db.resolve().parent / "artifacts" / _safe_name(experiment)).as_uri()


def _configure_http_env() -> None:
    for key, value in _HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # the user's own settings win


def _warn(message: str) -> None:
    """Warn, attributed to the first frame outside this module (calls reach here at varying depths)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, TrackingWarning, stacklevel=level)


# ---------------------------------------------------------------------------------- reachability


def _short_reason(err: BaseException) -> str:
    """One line for a network failure: '[Errno 111] Connection refused' rather than urllib3's essay."""
    text = " ".join(str(err).split())
    errno = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    if errno:
        return errno.group(0).strip(" :,")
    if "timed out" in text.lower() or "timeout" in type(err).__name__.lower():
        return "timed out"
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when `uri` answers (or is not a server); else a short reason. Fast, unlike mlflow's retries."""
    if not _is_http(uri):
        return None
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as err:
        return _short_reason(err)
    # any answer from the server counts (a 404 or 401 is still a live server); 5xx is a proxy without one
    return f"HTTP {response.status_code}" if response.status_code >= 500 else None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # mlflow re-raises request failures inside `except` without `from`, so follow __context__ too
        current = current.__cause__ or current.__context__


def _is_unreachable(err: BaseException) -> bool:
    """True for failures that a later retry may fix (network, server 5xx, a locked database)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    transient_requests = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
    )
    for e in _chain(err):
        if isinstance(e, (ConnectionError, TimeoutError) + transient_requests):
            return True
        if type(e).__name__ == "OperationalError" and type(e).__module__.startswith("sqlalchemy"):
            return True  # sqlite "database is locked" / "unable to open database file"
        if isinstance(e, MlflowException):
            status = e.get_http_status_code()
            if status in (429, 503, 504):  # rate limited, TEMPORARILY_UNAVAILABLE, deadline exceeded
                return True
            # a JSON error from the server, or mlflow's wrapper for a non-JSON 5xx (e.g. a proxy's 502)
            if status >= 500 and (isinstance(e, RestException) or str(e.message).startswith("API request to")):
                return True
    return False


# ---------------------------------------------------------------------------------- experiments


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file but not its folder
    return MlflowClient(tracking_uri=tracking_uri)


def _ensure_experiment(client: Any, tracking_uri: str, name: str, artifact_root: Optional[str] = None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root or _default_artifact_location(tracking_uri, name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def close_if_running(tracking_uri: str, run_id: str, status: str, tags: dict) -> bool:
    """End a run its own process could not end (e.g. a search trial whose actor was stopped from outside).
    Returns True when it was still running; quietly False when the store cannot be reached."""
    try:
        client = _client(tracking_uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        client.set_terminated(run_id, status=status)
        return True
    except Exception as err:  # noqa: BLE001 - the sweep's result must not depend on the tracking store
        if _is_unreachable(err):
            return False
        raise


def prepare(tracking_uri: str, experiment: str, artifact_root: Optional[str] = None) -> str:
    """Create the store and experiment once, on the driver, before workers start; returns the experiment id.

    Raises TrackingUnavailable (one line naming the URI) when the store cannot be reached.
    """
    _configure_http_env()
    reason = _probe(tracking_uri)
    if reason is not None:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(tracking_uri)} unreachable ({reason})")
    try:
        return _ensure_experiment(_client(tracking_uri), tracking_uri, experiment, artifact_root)
    except Exception as err:
        if _is_unreachable(err):
            raise TrackingUnavailable(
                f"MLflow tracking store {redact_uri(tracking_uri)} unavailable ({_short_reason(err)})"
            ) from None
        raise


def check_readable(tracking_uri: str) -> None:
    """Raise TrackingUnavailable (one line) unless the store exists and answers. Reading commands call it
    first: mlflow would silently create an empty sqlite store, or retry an unreachable server for minutes."""
    _configure_http_env()
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise TrackingUnavailable(
            f"no MLflow store at {db} (run `hidrop demo` or another command first, or pass --tracking-uri)"
        )
    reason = _probe(tracking_uri)
    if reason is not None:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(tracking_uri)} unreachable ({reason})")


def serve_ui(
    tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, ready_timeout: float = 120.0
) -> "subprocess.Popen":
    """Start `mlflow ui` over `tracking_uri` and return once it answers; the caller waits on the process.
    Raises TrackingUnavailable for a missing store, a port in use, or a server that dies while starting."""
    import socket
    import subprocess

    import requests

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
    db = _sqlite_path(tracking_uri)
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


def stop_ui(process: "subprocess.Popen") -> None:
    """Stop the UI server and its workers (they share its process group)."""
    import signal
    import subprocess

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


# ---------------------------------------------------------------------------------- the tracker


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """One MLflow run, resumable, that never loses data when the server is down.

    `enabled=False` turns every method into a no-op (non-zero ranks). `retry_interval` throttles the
    replay attempts made implicitly by logging calls while offline (a dead host can cost a timeout per
    attempt); `flush()` and `finish()` always try.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_id: Optional[str] = None,
        run_name: Optional[str] = None,
        parent_run_id: Optional[str] = None,
        tags: Optional[dict] = None,
        spool_dir: str | Path | None = None,
        enabled: bool = True,
        retry_interval: float = 5.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: Optional[str] = run_id
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags: dict[str, str] = {str(k): str(v) for k, v in (tags or {}).items()}
        self.enabled = enabled
        self.retry_interval = retry_interval
        self.experiment_id: Optional[str] = None
        spool_dir = Path(spool_dir) if spool_dir is not None else Path(DEFAULT_TRACKING_DIR) / "spool"
        # a random suffix: ranks or trials sharing a run name must never append to the same spool
        stem = f"{_safe_name(experiment)}-{_safe_name(run_name or run_id or 'run')}-{uuid.uuid4().hex[:8]}"
        self.spool_path: Path = spool_dir.resolve() / f"{stem}.jsonl"

        self._started = False
        self._pending: list[dict] = []  # records in the spool file, oldest first
        self._warned_offline = False
        self._stuck = False  # a spooled record was rejected by the store: retrying will not help
        self._last_attempt = -math.inf
        self._warned_nonfinite: set[str] = set()
        self._lock = threading.RLock()  # a metrics thread may log next to the training loop
        self._client_obj: Any = None
        self._client_uri: Optional[str] = None

    # -- public API -------------------------------------------------------------------------------

    def start(self) -> "Tracker":
        """Create the run, or resume `run_id` (same run, status back to RUNNING)."""
        if not self.enabled or self._started:
            return self
        _configure_http_env()
        self._started = True
        tags = dict(self.tags)
        if self.parent_run_id:
            tags[N.PARENT_RUN] = self.parent_run_id
        record = {"op": "start", "time": _now_ms(), "run_name": self.run_name, "tags": tags}
        reason = _probe(self.tracking_uri)  # fail fast instead of sitting through mlflow's retries
        if reason is not None:
            with self._lock:
                self._last_attempt = time.monotonic()
                self._spool(record, reason)
        else:
            self._submit(record)
        return self

    def log_params(self, params: dict) -> None:
        """Values are stringified and cut to mlflow's 6000-character limit; sent in batches of <= 100."""
        if not self.enabled or not params:
            return
        items = [(str(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._submit({"op": "params", "params": dict(chunk)})

    def log_config(self, config: "ExperimentConfig") -> None:
        """The flattened (dotted-name) params, plus the resolved YAML as artifact config/experiment.yaml."""
        if not self.enabled:
            return
        import yaml

        from hidrop_platform.config import flatten

        self.log_params(flatten(config))
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        self.log_text(text, N.CONFIG_YAML)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batch with an explicit step and timestamp; non-finite values are skipped (one warning per key)."""
        if not self.enabled:
            return
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            if value is None:  # not measured (e.g. a relative score against an all-zero reference)
                continue
            value = float(value)
            if math.isfinite(value):
                clean[str(key)] = value
            elif key not in self._warned_nonfinite:
                self._warned_nonfinite.add(key)
                _warn(f"metric {key!r} is {value} at step {step}; non-finite values are not logged")
        if clean:
            self._submit({"op": "metrics", "metrics": clean, "step": int(step), "timestamp": _now_ms()})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """A file or a folder. While offline it is copied into the spool, so later edits do not leak in."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        self._submit({"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._submit({"op": "text", "text": text, "artifact_file": artifact_file})

    def log_dict(self, d: dict, artifact_file: str) -> None:
        """JSON, or YAML for a .yaml/.yml name (mlflow's rule)."""
        if self.enabled:
            # round-trip through JSON now: the spool must hold plain data, and later mutation must not leak in
            plain = json.loads(json.dumps(d, default=str))
            self._submit({"op": "dict", "dict": plain, "artifact_file": artifact_file})

    def set_tags(self, tags: dict) -> None:
        if not self.enabled or not tags:
            return
        items = [(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._submit({"op": "tags", "tags": dict(chunk)})

    def flush(self) -> bool:
        """Try to send everything spooled; True when nothing is left."""
        if not self.enabled:
            return True
        with self._lock:
            return self._flush(implicit=False)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (flushing the spool first). If the store stays unreachable the spool is kept."""
        if not self.enabled:
            return
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"finish: status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        if not self._started:
            self.start()
        with self._lock:
            self._flush(implicit=False)
            self._submit({"op": "finish", "status": status, "end_time": _now_ms()})
            if self._pending:
                _warn(
                    f"MLflow run not fully synced to {redact_uri(self.tracking_uri)}; {len(self._pending)} records "
                    f'kept in {self.spool_path}. Replay them later with: python -c "from hidrop_platform.'
                    f"tracking import sync_spool; sync_spool('{self.spool_path}')\""
                )

    @property
    def offline(self) -> bool:
        """True while records wait in the spool."""
        return bool(self._pending)

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- sending ----------------------------------------------------------------------------------

    def _client(self) -> Any:
        # rebuilt when the URI changes (a test, or a caller pointing a spool at another store)
        if self._client_obj is None or self._client_uri != self.tracking_uri:
            self._client_obj = _client(self.tracking_uri)
            self._client_uri = self.tracking_uri
        return self._client_obj

    def _submit(self, record: dict) -> None:
        """Send one record now, or queue it behind earlier ones when the store is unreachable."""
        if not self._started:
            self.start()
        with self._lock:
            if self._pending:
                self._flush(implicit=True)
            if self._pending:  # order matters: nothing may overtake what is already queued
                self._spool(record)
                return
            try:
                self._apply(record)
            except Exception as err:
                if not _is_unreachable(err):
                    raise
                self._last_attempt = time.monotonic()  # this was the attempt: throttle the next one
                self._spool(record, _short_reason(err))

    def _apply(self, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client()
        op = record["op"]
        if op == "start":
            self._apply_start(client, record)
        elif op == "params":
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in record["params"].items()])
        elif op == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "metrics":
            client.log_batch(
                self.run_id,
                metrics=[Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()],
            )
        elif op == "artifact":
            local = Path(record["path"])
            if record.get("spooled"):  # relative to the spool's folder, so a spool can be moved as a whole
                local = self.spool_path.parent / local
            client.log_artifact(self.run_id, str(local), record["artifact_path"])
        elif op == "text":
            client.log_text(self.run_id, record["text"], record["artifact_file"])
        elif op == "dict":
            client.log_dict(self.run_id, record["dict"], record["artifact_file"])
        elif op == "finish":
            client.set_terminated(self.run_id, record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown spool record op {op!r}")

    def _apply_start(self, client: Any, record: dict) -> None:
        from mlflow.entities import RunTag

        if self.experiment_id is None:
            self.experiment_id = _ensure_experiment(client, self.tracking_uri, self.experiment)
        tags = dict(record["tags"])
        if self.run_id is None:
            try:
                tags.setdefault("mlflow.user", getpass.getuser())
            except Exception:  # no user name in some containers
                pass
            run = client.create_run(
                self.experiment_id, start_time=record["time"], tags=tags, run_name=record["run_name"]
            )
            self.run_id = run.info.run_id
            if self._pending:  # name the run in the spool at once, so a crash cannot create it twice
                self._write_spool()
        else:
            client.update_run(self.run_id, status="RUNNING")
            if tags:
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _apply_head(self) -> int:
        """Apply the oldest queued record(s); returns how many were consumed."""
        head = self._pending[0]
        if head["op"] != "metrics":
            self._apply(head)
            return 1
        # consecutive metric records go out as one log_batch: hours offline are thousands of steps
        from mlflow.entities import Metric

        batch: list = []
        count = 0
        for record in self._pending:
            if record["op"] != "metrics" or len(batch) + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
                break
            batch += [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
            count += 1
        if count == 0:  # a single record larger than a batch
            self._apply(head)
            return 1
        self._client().log_batch(self.run_id, metrics=batch)
        return count

    def _flush(self, implicit: bool, raise_errors: bool = False) -> bool:
        if not self._pending:
            return True
        now = time.monotonic()
        if implicit and (self._stuck or now - self._last_attempt < self.retry_interval):
            return False
        self._last_attempt = now
        if _probe(self.tracking_uri) is not None:
            return False
        sent = 0
        try:
            while self._pending:
                consumed = self._apply_head()
                del self._pending[:consumed]
                sent += consumed
        except Exception as err:
            self._write_spool()  # drop what was sent, so a later replay does not repeat it
            if _is_unreachable(err):
                return False
            if raise_errors:
                raise
            if not self._stuck:
                self._stuck = True
                _warn(
                    f"MLflow store {redact_uri(self.tracking_uri)} rejected a buffered {self._pending[0]['op']!r} "
                    f"record ({_short_reason(err)}); it and later records stay in {self.spool_path}"
                )
            return False
        self._remove_spool()
        _warn(
            f"MLflow tracking server {redact_uri(self.tracking_uri)} reachable again; synced {sent} buffered "
            f"records into run {self.run_id}"
        )
        self._warned_offline = False  # a new outage gets its own warning
        return True

    # -- the spool file ---------------------------------------------------------------------------

    def _header(self) -> dict:
        return {
            "op": "run",
            "version": SPOOL_VERSION,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "run_id": self.run_id,
            "run_name": self.run_name,
        }

    def _files_dir(self) -> Path:
        return self.spool_path.with_suffix(".files")

    def _spool(self, record: dict, reason: str = "") -> None:
        if record["op"] == "artifact" and not record.get("spooled"):
            record = self._copy_into_spool(record)
        new_file = not self._pending or not self.spool_path.exists()
        self._pending.append(record)
        if new_file:
            self._write_spool()
        else:
            with self.spool_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if not self._warned_offline:
            self._warned_offline = True
            why = f" ({reason})" if reason else ""
            _warn(
                f"MLflow tracking server {redact_uri(self.tracking_uri)} unreachable{why}; buffering to "
                f"{self.spool_path}, will retry (if it stays down: hidrop_platform.tracking.sync_spool(path))"
            )

    def _copy_into_spool(self, record: dict) -> dict:
        source = Path(record["path"])
        target_dir = self._files_dir() / uuid.uuid4().hex[:12]
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return {**record, "path": target.relative_to(self.spool_path.parent).as_posix(), "spooled": True}

    def _write_spool(self) -> None:
        """Rewrite the whole file (header + what is still pending) atomically."""
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in [self._header()] + self._pending:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.spool_path)

    def _remove_spool(self) -> None:
        self.spool_path.unlink(missing_ok=True)
        shutil.rmtree(self._files_dir(), ignore_errors=True)


def sync_spool(path: str | Path, tracking_uri: Optional[str] = None) -> str:
    """Replay a spool file left by an offline Tracker; returns the run id. The file is removed once synced.

    `tracking_uri` defaults to the store the spool was meant for. Raises TrackingUnavailable when it still
    cannot be reached (the spool is kept), and mlflow's error when the store rejects a record.
    """
    path = Path(path).resolve()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or lines[0].get("op") != "run":
        raise ValueError(f"{path}: not a tracking spool file (no header line)")
    header, records = lines[0], lines[1:]
    tracker = Tracker(
        tracking_uri or header["tracking_uri"],
        header["experiment"],
        run_id=header["run_id"],
        run_name=header["run_name"],
        spool_dir=path.parent,
    )
    tracker.spool_path = path
    tracker._started = True
    tracker._pending = records
    _configure_http_env()
    with tracker._lock:
        if not tracker._flush(implicit=False, raise_errors=True):
            raise TrackingUnavailable(
                f"MLflow tracking server {redact_uri(tracker.tracking_uri)} unreachable; spool kept at {path}"
            )
    assert tracker.run_id is not None
    return tracker.run_id


# ---------------------------------------------------------------------------------- environment


_last_cpu_times: Optional[tuple[float, float]] = None


def _proc_cpu_percent() -> float:
    """System CPU use since the previous call (since boot on the first), from /proc/stat."""
    global _last_cpu_times
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields)
    prev_idle, prev_total = _last_cpu_times or (0.0, 0.0)
    _last_cpu_times = (idle, total)
    delta = total - prev_total
    return 100.0 * (1.0 - (idle - prev_idle) / delta) if delta > 0 else 0.0


def _proc_kib(path: str, key: str) -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return 0.0


def system_metrics() -> dict[str, float]:
    """CPU percent, process RSS, system memory used (GB = 1e9 bytes) and, when CUDA is in use, GPU memory.

    Keys are prefixed `system/`. The first CPU reading of a process is not meaningful (psutil reports 0).
    """
    gb = 1e9
    out: dict[str, float] = {}
    try:
        import psutil

        out["system/cpu_percent"] = psutil.cpu_percent(interval=None)
        out["system/process_rss_gb"] = psutil.Process().memory_info().rss / gb
        vm = psutil.virtual_memory()
        out["system/memory_used_gb"] = (vm.total - vm.available) / gb
    except ImportError:
        if Path("/proc/meminfo").exists():  # Linux; elsewhere without psutil there is nothing cheap to read
            out["system/cpu_percent"] = _proc_cpu_percent()
            out["system/process_rss_gb"] = _proc_kib("/proc/self/status", "VmRSS") * 1024 / gb
            total, available = _proc_kib("/proc/meminfo", "MemTotal"), _proc_kib("/proc/meminfo", "MemAvailable")
            out["system/memory_used_gb"] = (total - available) * 1024 / gb
    # only a process that already uses torch has GPU memory of its own; never import it (or init CUDA) here
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"system/gpu{i}_memory_allocated_gb"] = torch.cuda.memory_allocated(i) / gb
            out[f"system/gpu{i}_memory_reserved_gb"] = torch.cuda.memory_reserved(i) / gb
    return out


_VERSIONED = ("torch", "transformers", "ray", "deepspeed", "mlflow", "peft", "hidrop")


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (absent packages are left out), read from metadata, never imported."""
    from importlib import metadata

    out = {"python": ".".join(str(x) for x in sys.version_info[:3])}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def schedule_params(schedule) -> dict[str, Any]:
    """The resolved schedule as MLflow params, the same for sweep trials and trainings: what the report
    needs to find the paper's row of the same method and budget, and to tell runs apart that differ
    only in position encoding (Table 10)."""
    from hidrop.evaluation.published import schedule_method

    # no key here is a field of the YAML's schedule section (flatten(cfg) logs those first)
    return {
        N.PLAN: schedule.describe(),
        N.KEEP_COUNTS: schedule.keep_counts,
        N.RESOLVED_NAME: schedule.name,
        N.METHOD: schedule_method(schedule),
        N.RESOLVED_AVG_TOKENS: round(schedule.avg_tokens(), 4),
        N.RESOLVED_POSITION_MODE: schedule.position_mode.value,
        N.RESOLVED_QUERY_RULE: schedule.query_rule.value,
        N.RESOLVED_SELECTOR: schedule.selector.value,
    }
