"""`<sweep>/trial_runs/`: one record per point of a sweep (label + sampled overrides -> its MLflow run id,
its attempts and, once done, its result). A retried or resumed trial logs into the same run, and a
finished point is never evaluated twice. Only the trial reads and writes its record: when it starts (the
run id, before anything can crash) and when it has its result. Everything else learns the run id from the
results the trial reports to Tune (`RUN_ID_KEY`); only a trial that failed before reporting anything is
looked up here by the sweep's summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from hidrop_platform.tracking.store import safe_name

RUNS_DIR = "trial_runs"
RUN_ID_KEY = "trial_run_id"  # in every result a trial reports to Tune: its MLflow run id


def point_key(config: dict) -> str:
    """A trial's key in `trial_runs/`: its label and sampled overrides, not Tune's trial id. After a
    crash Tune restores an older snapshot and hands the same points out again under new trial ids;
    keyed by the point, a finished one is reported from its record, never evaluated or logged twice."""
    point = {"label": config.get("label"), "overrides": config.get("overrides")}
    point = json.dumps(point, sort_keys=True, default=str)
    digest = hashlib.sha256(point.encode()).hexdigest()[:16]
    return f"{safe_name(str(config.get('label', 'trial')))}-{digest}"


@dataclasses.dataclass
class TrialRun:
    """What earlier attempts at one point left: its MLflow run id, attempts, and its result once done."""

    path: Path
    run_id: Optional[str] = None
    attempts: int = 0
    result: Optional[dict] = None

    @classmethod
    def read(cls, sweep_dir: str, config: dict) -> TrialRun:
        """The point's record; an empty one before its first attempt."""
        path = Path(sweep_dir) / RUNS_DIR / f"{point_key(config)}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, record.get("run_id"), int(record.get("attempts", 0)), record.get("result"))

    def write(self) -> None:
        """Replace the record at once (a reader never sees half of it)."""
        record: dict = {"run_id": self.run_id, "attempts": self.attempts}
        if self.result is not None:
            record["result"] = self.result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)
