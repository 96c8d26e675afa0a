"""MLflow tracking that never loses data: one resumable run per `Tracker`, spooled to disk while offline.

This is the only module of the project that imports mlflow, and it does so lazily (inside functions), so
`import hidrop_platform.tracking.store` stays cheap for code paths that never log (CLI help, non-zero ranks).

Local default store: sqlite under `./mlruns` (`default_tracking_uri()`), artifacts in `./mlruns/artifacts`.
The driver calls `prepare()` once before workers start, because concurrent processes creating a new
sqlite database race on its schema migration. A remote store is an MLflow server, `http://host:port`.

Offline behaviour: a call that fails because the store cannot be reached is appended as one JSON line to
a spool file (the first line names the run) and a single warning says so. Later calls replay the spool
first, in order, into the same run; metrics keep their original step and timestamp. A spool left behind
(the server never came back) is replayed later with `sync_spool(path)`. The spool file itself is
`hidrop_platform.tracking.spool`.

What is MLflow's and what is ours: MLflow's `log_batch` splits large batches (we only cut values to its
length limits), and its client does the HTTP retries. We keep logging synchronous and sample system
metrics ourselves (psutil, at the training step): MLflow's asynchronous logging and its
`SystemMetricsMonitor` send from their own threads straight to the store, so while it is unreachable their
records would bypass the spool and be lost, and the monitor's samples would not line up with steps.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import psutil

from hidrop.errors import UserError
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.spool import SPOOL_VERSION, Spool

if TYPE_CHECKING:  # only for annotations: the config module pulls in the schedule code
    from hidrop_platform.config.schema import ExperimentConfig

DEFAULT_TRACKING_DIR = "mlruns"
DB_FILE = "mlflow.db"
SPOOL_DIR_ENV = "HIDROP_SPOOL_DIR"

# mlflow's own limits (mlflow.utils.validation), repeated here so that importing this module stays cheap
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000  # a spool replay groups metric records into requests of at most this many

PROBE_TIMEOUT_S = 3.0
# mlflow retries a failed request 7 times with exponential backoff by default (minutes of stalling while a
# server is down); the spool is our retry mechanism, so mlflow only needs to ride out a short blip.
_HTTP_ENV_DEFAULTS = {
    # MLflow prints "View run ... at: <uri>" on stdout when a run ends: --json output must stay JSON
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingUnavailable(UserError, RuntimeError):
    """The tracking store cannot be reached; the message is one line naming the URI."""


class TrackingWarning(UserWarning):
    """Tracking went offline, came back, or left data on disk."""


# ---------------------------------------------------------------------------------------------- URIs


def default_tracking_uri(root: str | Path = ".") -> str:
    """`sqlite:///ABS/mlruns/mlflow.db` under `root` (the working directory by default)."""
    return f"sqlite:///{(Path(root).resolve() / DEFAULT_TRACKING_DIR / DB_FILE).as_posix()}"


def sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))  # schemes are case-insensitive (RFC 3986)


def redact_uri(uri: str) -> str:
    """Drop `user:password@` from a URI before it goes into a message (any scheme, any case; up to the
    authority's last '@', so a raw '@' inside a password goes too)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", uri)


# MLflow's own tracking-store schemes (mlflow.tracking._tracking_service.utils); a plugin adds its own
_STORE_SCHEMES = ("file", "http", "https", "databricks", "postgresql", "mysql", "sqlite", "mssql")
# SQLAlchemy's driver module per dialect[+driver]; a driver not listed is left to SQLAlchemy
_DB_DRIVERS = {
    "postgresql": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
    "postgresql+pg8000": ("pg8000", "pg8000"),
    "mysql": ("MySQLdb", "mysqlclient"),
    "mysql+mysqldb": ("MySQLdb", "mysqlclient"),
    "mysql+pymysql": ("pymysql", "PyMySQL"),
    "mysql+mysqlconnector": ("mysql.connector", "mysql-connector-python"),
    "mssql": ("pyodbc", "pyodbc"),
    "mssql+pyodbc": ("pyodbc", "pyodbc"),
    "mssql+pymssql": ("pymssql", "pymssql"),
}


def check_tracking_uri(uri: Optional[str], enabled: bool = True) -> None:
    """Raise TrackingUnavailable when MLflow could never use `uri` (`tracking_uri_problem`): before any work."""
    problem = tracking_uri_problem(uri) if enabled and uri else None
    if problem is not None:
        raise TrackingUnavailable(problem)


def tracking_uri_problem(uri: str, name: str = "tracking.uri") -> Optional[str]:
    """Why MLflow could never use `uri` (a misspelled scheme, a database driver not installed, a sqlite
    path that is no database), or None. Offline: reachability is `_probe`'s. MLflow would otherwise fail
    with a traceback, or only when the first record is written, after the work."""
    import difflib
    import importlib.util
    from importlib.metadata import entry_points
    from urllib.parse import urlparse

    shown = f"{name}={redact_uri(uri)}" if name else f"tracking URI {redact_uri(uri)}"
    try:
        parsed = urlparse(uri)
        parsed.port  # noqa: B018 - raises for a port that is no number
    except ValueError as e:  # e.g. an unclosed IPv6 bracket
        return f"{shown} is not a valid URI ({e})"
    scheme = parsed.scheme.lower()
    if len(scheme) <= 1:  # a plain path (or a Windows drive letter): MLflow's file store
        return None
    base = scheme.split("+", 1)[0]
    if base not in _STORE_SCHEMES and base not in {e.name for e in entry_points(group="mlflow.tracking_store")}:
        near = difflib.get_close_matches(base, _STORE_SCHEMES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return (
            f"{shown}: unknown scheme '{scheme}'{hint}; MLflow takes http(s)://host:port, sqlite:///path.db, "
            "postgresql://, mysql://, mssql://, file:// or a folder"
        )
    if base in ("http", "https") and not parsed.netloc:
        return f"{shown}: names no host (write {base}://host:port)"
    if scheme in _DB_DRIVERS:
        module, package = _DB_DRIVERS[scheme]
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # the parent package of a dotted name is missing
            found = False
        if not found:
            return f"{shown}: its database driver {module} is not installed (pip install {package})"
    db = sqlite_path(uri)
    if db is not None:
        if db.is_dir():
            return f"{shown}: {db} is a folder, not a SQLite database file"
        if db.is_file() and db.stat().st_size > 0:
            try:
                with open(db, "rb") as f:
                    header = f.read(16)
            except OSError as e:
                return f"{shown}: cannot read {db} ({e.strerror or type(e).__name__})"
            if header != b"SQLite format 3\x00":
                return f"{shown}: {db} is not a SQLite database"
        elif not db.exists():
            from hidrop_platform.storage import write_problem

            problem = write_problem(db, folder=False)
            if problem is not None:
                return f"{shown}: cannot create the store: {problem}"
    return None


def safe_name(name: str) -> str:
    """`name` as a file-name part: runs of other characters become one underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _default_artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Local stores keep artifacts next to the database; servers choose their own location."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    # mlflow's own default would be ./mlruns relative to whatever the working directory happens to be
    return (db.resolve().parent / "artifacts" / safe_name(experiment)).as_uri()


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

    db = sqlite_path(tracking_uri)
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


def clear_interrupted(tracking_uri: str, run_id: str) -> None:
    """A continued run is no longer interrupted: drop the tags Ctrl+C left on it (best effort: with the
    store unreachable they stay)."""
    with contextlib.suppress(Exception):
        client = _client(tracking_uri)
        tags = client.get_run(run_id).data.tags
        if tags.get(N.STATUS) == N.INTERRUPTED:
            client.delete_tag(run_id, N.STATUS)
        if N.INTERRUPTED_AT_STEP in tags:
            client.delete_tag(run_id, N.INTERRUPTED_AT_STEP)


def last_logged_step(tracking_uri: str, run_id: str, key: str) -> Optional[int]:
    """The highest step at which `key` was logged in the run (None: never, or the store is unreachable):
    a resumed training skips the steps its earlier attempt logged after its last checkpoint."""
    try:
        history = _client(tracking_uri).get_metric_history(run_id, key)
    except Exception as err:  # noqa: BLE001 - offline: the resumed run logs what it redoes
        if _is_unreachable(err):
            return None
        raise
    return max((m.step for m in history), default=None)


def default_spool_dir() -> Path:
    """Where offline records wait: $HIDROP_SPOOL_DIR, else ./mlruns/spool, resolved (workers and trials
    may run elsewhere). A Ray job's working directory is deleted with the job, so there it is
    ~/.cache/hidrop/spool instead."""
    from hidrop_platform.cluster.connect import job_working_dir

    if os.environ.get(SPOOL_DIR_ENV):
        return Path(os.environ[SPOOL_DIR_ENV]).expanduser().resolve()
    if job_working_dir() is not None:
        return Path.home() / ".cache" / "hidrop" / "spool"
    return (Path(DEFAULT_TRACKING_DIR) / "spool").resolve()


def tracking_target(cfg: "ExperimentConfig") -> tuple[str, str]:
    """(tracking URI, MLflow experiment name) of an experiment: its `tracking:` section, else the local
    store and the experiment's name. The one place these defaults are resolved."""
    return cfg.tracking.uri or default_tracking_uri(), cfg.tracking.experiment or cfg.name


def prepare_for(cfg: "ExperimentConfig", what: str) -> tuple[str, str]:
    """`prepare` the experiment's store once, in the driver (concurrent workers or trials must not race on
    a new sqlite schema); an unreachable store is a warning, since `Tracker` buffers. Returns
    `tracking_target(cfg)`."""
    uri, experiment = tracking_target(cfg)
    if cfg.tracking.enabled:
        try:
            prepare(uri, experiment)
        except TrackingUnavailable as e:
            print(f"warning: {e}; {what} continues and its records are buffered locally", flush=True)
    return uri, experiment


def prepare(tracking_uri: str, experiment: str, artifact_root: Optional[str] = None) -> str:
    """Create the store and experiment once, on the driver, before workers start; returns the experiment id.

    Raises TrackingUnavailable (one line naming the URI) when the store cannot be reached.
    """
    _configure_http_env()
    reason = _probe(tracking_uri)
    if reason is not None:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(tracking_uri)} unreachable ({reason})")
    try:
        with _creation_lock(tracking_uri):
            _create_store_whole(tracking_uri)
            return _ensure_experiment(_client(tracking_uri), tracking_uri, experiment, artifact_root)
    except TrackingUnavailable:
        raise
    except Exception as err:
        if _is_unreachable(err):
            raise TrackingUnavailable(
                f"MLflow tracking store {redact_uri(tracking_uri)} unavailable ({_short_reason(err)})"
            ) from None
        raise


def _creation_lock(tracking_uri: str):
    """A new sqlite store is created and migrated by the first process that opens it; two sweeps started
    together would both run the migration (and one dies in alembic). A file lock next to the database
    lets one create it while the other waits; servers need none."""
    import contextlib

    from filelock import FileLock

    db = sqlite_path(tracking_uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=120)


def _create_store_whole(tracking_uri: str) -> None:
    """A new sqlite store is created and migrated under a temporary name, then renamed into place: a
    migration cut short (a full disk) must not leave a database that no later command can open."""
    db = sqlite_path(tracking_uri)
    if db is None or db.exists():
        return
    from mlflow import MlflowClient

    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates and migrates
        os.replace(tmp, db)
    except Exception as err:
        for leftover in db.parent.glob(f"{tmp.name}*"):  # the file and sqlite's journal
            leftover.unlink(missing_ok=True)
        text = " ".join(re.split(r"\s*\[SQL:", str(err))[0].split())  # sqlalchemy appends the statement
        reason = getattr(err, "strerror", None) or text[:200] or type(err).__name__
        raise TrackingUnavailable(f"cannot create the MLflow store {db}: {reason}") from None


def pending_spools(spool_dir: Path, since: float = 0.0) -> list[Path]:
    """Spool files (records that could not reach their store yet) written at or after `since`."""
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.glob("*.jsonl") if p.stat().st_mtime >= since)


def check_readable(tracking_uri: str) -> None:
    """Raise TrackingUnavailable (one line) unless the store exists and answers. Reading commands call it
    first: mlflow would silently create an empty sqlite store, or retry an unreachable server for minutes."""
    _configure_http_env()
    problem = tracking_uri_problem(tracking_uri, "")
    if problem is not None:
        raise TrackingUnavailable(problem)
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise TrackingUnavailable(
            f"no MLflow store at {db} (run `hidrop demo` or another command first, or pass --tracking-uri)"
        )
    if db is not None and not _holds_mlflow_tables(db):  # mlflow would create (write) its tables in it
        raise TrackingUnavailable(f"{db} is not an MLflow store (no MLflow tables in it); pass --tracking-uri")
    reason = _probe(tracking_uri)
    if reason is not None:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(tracking_uri)} unreachable ({reason})")


def _holds_mlflow_tables(db: Path) -> bool:
    """Whether a sqlite file already holds MLflow's tables; opened read-only, so reading never migrates it."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:  # not a database at all
        return False
    return {"experiments", "runs", "alembic_version"} <= names


# ---------------------------------------------------------------------------------- reading back


def read_runs(tracking_uri: str, experiment: str) -> Optional[list]:
    """Every run of `experiment`, newest first (all pages); None when there is no such experiment.
    TrackingUnavailable (one line) when the store cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"], page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except MlflowException as e:
        raise TrackingUnavailable(
            f"cannot read the MLflow store {redact_uri(tracking_uri)}: {str(e).splitlines()[0]}"
        ) from None


def experiment_names(tracking_uri: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(e.name for e in MlflowClient(tracking_uri=tracking_uri).search_experiments())


def download_artifact(tracking_uri: str, run_id: str, artifact_path: str, dst: str | Path) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, artifact_path, str(dst))


def upload_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Files into a finished run (the report, published on its sweep's parent run)."""
    client = _client(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


# ---------------------------------------------------------------------------------- the tracker


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir()
        # a random suffix: ranks or trials sharing a run name must never append to the same spool
        stem = f"{safe_name(experiment)}-{safe_name(run_name or run_id or 'run')}-{uuid.uuid4().hex[:8]}"
        self.spool = Spool(spool_dir.resolve() / f"{stem}.jsonl")

        self._started = False
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
        """Values are stringified and cut to mlflow's 6000-character limit (MLflow's log_batch chunks them)."""
        if not self.enabled or not params:
            return
        self._submit({"op": "params", "params": {str(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}})

    def log_config(self, config: "ExperimentConfig") -> None:
        """The flattened (dotted-name) params, plus the resolved YAML as artifact config/experiment.yaml."""
        if not self.enabled:
            return
        import yaml

        from hidrop_platform.config.schema import flatten

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
        self._submit({"op": "tags", "tags": {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}})

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
            if self.spool.pending:
                _warn(
                    f"MLflow run not fully synced to {redact_uri(self.tracking_uri)}; "
                    f"{len(self.spool.pending)} records "
                    f"kept in {self.spool_path}. Replay them later with: "
                    f"hidrop sync --spool-dir {self.spool_path.parent}"
                )

    @property
    def spool_path(self) -> Path:
        return self.spool.path

    @property
    def offline(self) -> bool:
        """True while records wait in the spool."""
        return bool(self.spool.pending)

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
            if self.spool.pending:
                self._flush(implicit=True)
            if self.spool.pending:  # order matters: nothing may overtake what is already queued
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
            client.log_artifact(self.run_id, str(self.spool.artifact_path(record)), record["artifact_path"])
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
            if self.spool.pending:  # name the run in the spool at once, so a crash cannot create it twice
                self._write_spool()
        else:
            client.update_run(self.run_id, status="RUNNING")
            if tags:
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _apply_head(self) -> int:
        """Apply the oldest queued record(s); returns how many were consumed."""
        head = self.spool.pending[0]
        if head["op"] != "metrics":
            self._apply(head)
            return 1
        # consecutive metric records go out as one log_batch: hours offline are thousands of steps
        from mlflow.entities import Metric

        batch: list = []
        count = 0
        for record in self.spool.pending:
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
        if not self.spool.pending:
            return True
        now = time.monotonic()
        if implicit and (self._stuck or now - self._last_attempt < self.retry_interval):
            return False
        self._last_attempt = now
        if _probe(self.tracking_uri) is not None:
            return False
        sent = 0
        try:
            while self.spool.pending:
                consumed = self._apply_head()
                del self.spool.pending[:consumed]
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
                    f"MLflow store {redact_uri(self.tracking_uri)} rejected a buffered {self.spool.pending[0]['op']!r} "
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

    def _spool(self, record: dict, reason: str = "") -> None:
        self.spool.add(record, self._header())
        if not self._warned_offline:
            self._warned_offline = True
            why = f" ({reason})" if reason else ""
            _warn(
                f"MLflow tracking server {redact_uri(self.tracking_uri)} unreachable{why}; buffering to "
                f"{self.spool_path}, will retry (if it stays down: hidrop_platform.tracking.store.sync_spool(path))"
            )

    def _write_spool(self) -> None:
        self.spool.rewrite(self._header())

    def _remove_spool(self) -> None:
        self.spool.remove()


def sync_spool(path: str | Path, tracking_uri: Optional[str] = None) -> str:
    """Replay a spool file left by an offline Tracker; returns the run id. The file is removed once synced.

    `tracking_uri` defaults to the store the spool was meant for. Raises TrackingUnavailable when it still
    cannot be reached (the spool is kept), and mlflow's error when the store rejects a record.
    """
    header, spool = Spool.read(path)
    tracker = Tracker(
        tracking_uri or header["tracking_uri"],
        header["experiment"],
        run_id=header["run_id"],
        run_name=header["run_name"],
        spool_dir=spool.path.parent,
    )
    tracker.spool = spool
    tracker._started = True
    _configure_http_env()
    with tracker._lock:
        if not tracker._flush(implicit=False, raise_errors=True):
            raise TrackingUnavailable(
                f"MLflow tracking server {redact_uri(tracker.tracking_uri)} unreachable; spool kept at {spool.path}"
            )
    assert tracker.run_id is not None
    return tracker.run_id


# ---------------------------------------------------------------------------------- environment


def system_metrics() -> dict[str, float]:
    """CPU percent, process RSS, system memory used (GB = 1e9 bytes) and, when CUDA is in use, GPU memory.

    Keys are prefixed `system/`. The first CPU reading of a process is not meaningful (psutil reports 0).
    """
    gb = 1e9
    out: dict[str, float] = {}
    out["system/cpu_percent"] = psutil.cpu_percent(interval=None)
    out["system/process_rss_gb"] = psutil.Process().memory_info().rss / gb
    vm = psutil.virtual_memory()
    out["system/memory_used_gb"] = (vm.total - vm.available) / gb
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
