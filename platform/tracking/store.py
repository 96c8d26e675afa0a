"""The MLflow store: its URI (the local default, offline checks, redaction), whether it answers, its
client and experiments, and reading runs and artifacts back.

Local default store: sqlite under `./mlruns` (`default_tracking_uri()`), artifacts in `./mlruns/artifacts`.
The driver calls `prepare()` once before workers start, because concurrent processes creating a new
sqlite database race on its schema migration. A remote store is an MLflow server, `http://host:port`.
Logging into a run is `hidrop_platform.tracking.tracker`'s.

Only hidrop_platform.tracking imports mlflow, and lazily (inside functions), so importing this module
stays cheap for code paths that never log (CLI help, non-zero ranks).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from hidrop.errors import UserError
from hidrop_platform.cluster.connect import job_working_dir
from hidrop_platform.storage import write_problem
from hidrop_platform.tracking import names as N

if TYPE_CHECKING:  # only for annotations: the config module pulls in the schedule code
    from hidrop_platform.config.schema import ExperimentConfig

DEFAULT_TRACKING_DIR = "mlruns"
DB_FILE = "mlflow.db"
SPOOL_DIR_ENV = "HIDROP_SPOOL_DIR"

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


class TrackingUnavailable(UserError, RuntimeError):
    """The tracking store cannot be reached; the message is one line naming the URI."""


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
    path that is no database), or None. Offline: reachability is `unreachable_reason`'s. MLflow would
    otherwise fail with a traceback, or only when the first record is written, after the work."""
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


def configure_http_env() -> None:
    """MLflow's HTTP settings for a store that may be down (`_HTTP_ENV_DEFAULTS`), unless the user set them."""
    for key, value in _HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # the user's own settings win


# ---------------------------------------------------------------------------------- reachability


def short_reason(err: BaseException) -> str:
    """One line for a network failure: '[Errno 111] Connection refused' rather than urllib3's essay."""
    text = " ".join(str(err).split())
    errno = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    if errno:
        return errno.group(0).strip(" :,")
    if "timed out" in text.lower() or "timeout" in type(err).__name__.lower():
        return "timed out"
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def unreachable_reason(uri: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when `uri` answers (or is not a server); else a short reason. Fast, unlike mlflow's retries."""
    if not _is_http(uri):
        return None
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as err:
        return short_reason(err)
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


def is_unreachable(err: BaseException) -> bool:
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


def client_for(tracking_uri: str) -> Any:
    """An MlflowClient of the store (a sqlite store's folder is created first)."""
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file but not its folder
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: Any, tracking_uri: str, name: str, artifact_root: Optional[str] = None) -> str:
    """The id of experiment `name`, created when missing (another process may create it at the same time)."""
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
        client = client_for(tracking_uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        client.set_terminated(run_id, status=status)
        return True
    except Exception as err:  # noqa: BLE001 - the sweep's result must not depend on the tracking store
        if is_unreachable(err):
            return False
        raise


def clear_interrupted(tracking_uri: str, run_id: str) -> None:
    """A continued run is no longer interrupted: drop the tags Ctrl+C left on it (best effort: with the
    store unreachable they stay)."""
    with contextlib.suppress(Exception):
        client = client_for(tracking_uri)
        tags = client.get_run(run_id).data.tags
        if tags.get(N.STATUS) == N.INTERRUPTED:
            client.delete_tag(run_id, N.STATUS)
        if N.INTERRUPTED_AT_STEP in tags:
            client.delete_tag(run_id, N.INTERRUPTED_AT_STEP)


def last_logged_step(tracking_uri: str, run_id: str, key: str) -> Optional[int]:
    """The highest step at which `key` was logged in the run (None: never, or the store is unreachable):
    a resumed training skips the steps its earlier attempt logged after its last checkpoint."""
    try:
        history = client_for(tracking_uri).get_metric_history(run_id, key)
    except Exception as err:  # noqa: BLE001 - offline: the resumed run logs what it redoes
        if is_unreachable(err):
            return None
        raise
    return max((m.step for m in history), default=None)


def default_spool_dir() -> Path:
    """Where offline records wait: $HIDROP_SPOOL_DIR, else ./mlruns/spool, resolved (workers and trials
    may run elsewhere). A Ray job's working directory is deleted with the job, so there it is
    ~/.cache/hidrop/spool instead."""
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
    configure_http_env()
    reason = unreachable_reason(tracking_uri)
    if reason is not None:
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(tracking_uri)} unreachable ({reason})")
    try:
        with _creation_lock(tracking_uri):
            _create_store_whole(tracking_uri)
            return ensure_experiment(client_for(tracking_uri), tracking_uri, experiment, artifact_root)
    except TrackingUnavailable:
        raise
    except Exception as err:
        if is_unreachable(err):
            raise TrackingUnavailable(
                f"MLflow tracking store {redact_uri(tracking_uri)} unavailable ({short_reason(err)})"
            ) from None
        raise


def _creation_lock(tracking_uri: str):
    """A new sqlite store is created and migrated by the first process that opens it; two sweeps started
    together would both run the migration (and one dies in alembic). A file lock next to the database
    lets one create it while the other waits; servers need none."""
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


def check_readable(tracking_uri: str) -> None:
    """Raise TrackingUnavailable (one line) unless the store exists and answers. Reading commands call it
    first: mlflow would silently create an empty sqlite store, or retry an unreachable server for minutes."""
    configure_http_env()
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
    reason = unreachable_reason(tracking_uri)
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
    client = client_for(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
