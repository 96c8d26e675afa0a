"""`Tracker`: one MLflow run, resumable, that never loses data when the store is down.

Offline behaviour: a call that fails because the store cannot be reached is appended as one JSON line to
a spool file (the first line names the run) and a single warning says so. Later calls replay the spool
first, in order, into the same run; metrics keep their original step and timestamp. A spool left behind
(the server never came back) is replayed later with `hidrop_platform.tracking.spool.sync_spool(path)`. The
spool file itself is `hidrop_platform.tracking.spool_file`.

What is MLflow's and what is ours: MLflow's `log_batch` splits large batches (we only cut values to its
length limits), and its client does the HTTP retries. We keep logging synchronous and sample system
metrics ourselves (psutil, at the training step): MLflow's asynchronous logging and its
`SystemMetricsMonitor` send from their own threads straight to the store, so while it is unreachable their
records would bypass the spool and be lost, and the monitor's samples would not line up with steps.
"""

from __future__ import annotations

import getpass
import json
import math
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from hidrop_platform.config.loader import flatten
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.spool_file import SPOOL_VERSION, Spool
from hidrop_platform.tracking.store import (
    client_for,
    configure_http_env,
    default_spool_dir,
    ensure_experiment,
    is_unreachable,
    redact_uri,
    safe_name,
    short_reason,
    unreachable_reason,
)

# mlflow's own limits (mlflow.utils.validation), repeated here so that importing this module stays cheap
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000  # a spool replay groups metric records into requests of at most this many

_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PACKAGE_DIR = Path(__file__).parent  # warnings name the first caller outside it


class TrackingWarning(UserWarning):
    """Tracking went offline, came back, or left data on disk."""


def _warn(message: str) -> None:
    """Warn, attributed to the first frame outside this package (calls reach here at varying depths, and
    through `sync_spool`)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and Path(frame.f_code.co_filename).parent == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, TrackingWarning, stacklevel=level)


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
        configure_http_env()
        self._started = True
        tags = dict(self.tags)
        if self.parent_run_id:
            tags[N.PARENT_RUN] = self.parent_run_id
        record = {"op": "start", "time": _now_ms(), "run_name": self.run_name, "tags": tags}
        reason = unreachable_reason(self.tracking_uri)  # fail fast instead of sitting through mlflow's retries
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

    def log_config(self, config: ExperimentConfig) -> None:
        """The flattened (dotted-name) params, plus the resolved YAML as artifact config/experiment.yaml."""
        if not self.enabled:
            return
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

    @classmethod
    def from_spool(cls, header: dict, spool: Spool, tracking_uri: Optional[str] = None) -> "Tracker":
        """The tracker of a spool left behind (`Spool.read`), to `replay` it; `tracking_uri` defaults to the
        store the spool was meant for."""
        tracker = cls(
            tracking_uri or header["tracking_uri"],
            header["experiment"],
            run_id=header["run_id"],
            run_name=header["run_name"],
            spool_dir=spool.path.parent,
        )
        tracker.spool = spool
        tracker._started = True  # nothing to start: what is left of the run, its creation included, is spooled
        return tracker

    def replay(self) -> bool:
        """Send everything spooled now; False while the store cannot be reached (the spool is kept), and
        the store's error when it rejects a record."""
        configure_http_env()
        with self._lock:
            return self._flush(implicit=False, raise_errors=True)

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
            self._client_obj = client_for(self.tracking_uri)
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
                if not is_unreachable(err):
                    raise
                self._last_attempt = time.monotonic()  # this was the attempt: throttle the next one
                self._spool(record, short_reason(err))

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
            self.experiment_id = ensure_experiment(client, self.tracking_uri, self.experiment)
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
        if unreachable_reason(self.tracking_uri) is not None:
            return False
        sent = 0
        try:
            while self.spool.pending:
                consumed = self._apply_head()
                del self.spool.pending[:consumed]
                sent += consumed
        except Exception as err:
            self._write_spool()  # drop what was sent, so a later replay does not repeat it
            if is_unreachable(err):
                return False
            if raise_errors:
                raise
            if not self._stuck:
                self._stuck = True
                _warn(
                    f"MLflow store {redact_uri(self.tracking_uri)} rejected a buffered {self.spool.pending[0]['op']!r} "
                    f"record ({short_reason(err)}); it and later records stay in {self.spool_path}"
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
                f"{self.spool_path}, will retry (if it stays down: hidrop_platform.tracking.spool.sync_spool(path))"
            )

    def _write_spool(self) -> None:
        self.spool.rewrite(self._header())

    def _remove_spool(self) -> None:
        self.spool.remove()
