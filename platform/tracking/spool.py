"""Spools left behind: records an offline `Tracker` could not send before its process ended (the store
never came back), found in a spool folder and replayed into their runs (`hidrop sync`). The file format
is `hidrop_platform.tracking.spool_file`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from hidrop_platform.tracking.spool_file import Spool
from hidrop_platform.tracking.store import TrackingUnavailable, redact_uri
from hidrop_platform.tracking.tracker import Tracker


def pending_spools(spool_dir: Path, since: float = 0.0) -> list[Path]:
    """Spool files (records that could not reach their store yet) written at or after `since`."""
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.glob("*.jsonl") if p.stat().st_mtime >= since)


def sync_spool(path: str | Path, tracking_uri: Optional[str] = None) -> str:
    """Replay a spool file left by an offline Tracker; returns the run id. The file is removed once synced.

    `tracking_uri` defaults to the store the spool was meant for. Raises TrackingUnavailable when it still
    cannot be reached (the spool is kept), and mlflow's error when the store rejects a record.
    """
    header, spool = Spool.read(path)
    tracker = Tracker.from_spool(header, spool, tracking_uri)
    if not tracker.replay():
        raise TrackingUnavailable(
            f"MLflow tracking server {redact_uri(tracker.tracking_uri)} unreachable; spool kept at {spool.path}"
        )
    assert tracker.run_id is not None
    return tracker.run_id
