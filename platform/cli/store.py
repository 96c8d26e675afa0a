"""`hidrop report`, `sync` and `ui`: what is done with the MLflow store once runs are in it (dashboards,
replaying spooled records, browsing)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

import hidrop_platform.cli.progress as progress
import hidrop_platform.cli.views as views
from hidrop.errors import UserError
from hidrop_dashboards.report import build_report
from hidrop_platform.cli.options import AsJson, OptionError, load_experiment, without_credentials
from hidrop_platform.storage import write_problem
from hidrop_platform.tracking.spool import pending_spools, sync_spool
from hidrop_platform.tracking.store import (
    TrackingUnavailable,
    check_readable,
    default_spool_dir,
    default_tracking_uri,
    redact_uri,
    tracking_target,
)
from hidrop_platform.tracking.ui import UI_TRAINING_VIEW, serve_ui, stop_ui, ui_base_url


def _report_source(experiment: str, tracking_uri: Optional[str]) -> tuple[str, str]:
    """(tracking URI, MLflow experiment name) from a name or an experiment YAML's tracking section."""
    if experiment.endswith((".yaml", ".yml")):
        uri, name = tracking_target(load_experiment(experiment))
        return without_credentials(tracking_uri) or uri, name
    return without_credentials(tracking_uri) or default_tracking_uri(), experiment


def report_command(
    experiment: str = typer.Argument(..., help="MLflow experiment name (e.g. demo), or an experiment YAML"),
    sweep: Optional[str] = typer.Option(None, help="which sweep (tune.name); default: the newest finished one"),
    out_dir: Optional[str] = typer.Option(None, "--out", help="output folder (default: reports/<experiment>)"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="default: the local store ./mlruns/mlflow.db"
    ),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="attach the files to the sweep's parent run"),
    as_json: AsJson = False,
):
    """Dashboards from MLflow: Pareto plot, methods x benchmarks table, training-cost table, diagnostics."""
    uri, name = _report_source(experiment, tracking_uri)
    target = out_dir or f"reports/{name}"
    problem = write_problem(target)
    if problem is not None:
        raise OptionError(f"--out {target}: {problem}")
    check_readable(uri)
    result = build_report(uri, name, target, sweep=sweep, publish=publish)
    if as_json:
        views.print_json(result)
        return
    views.print_report(result)


def _replay_spools(spool_dir: Path, tracking_uri: Optional[str]) -> list[dict]:
    """Each spool file replayed into its run: synced, waiting (the store is still unreachable or full) or
    rejected (the store refused a record; the file is kept)."""
    rows = []
    for path in pending_spools(spool_dir):
        try:
            rows.append({"file": str(path), "status": "synced", "run_id": sync_spool(path, tracking_uri)})
        except TrackingUnavailable as e:
            rows.append({"file": str(path), "status": "waiting", "error": str(e)})
        except Exception as e:  # noqa: BLE001 - the store rejected a record: say which file, keep it
            rows.append({"file": str(path), "status": "rejected", "error": " ".join(str(e).split())[:300]})
    return rows


def sync_command(
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="replay into this store (default: the one each record was meant for)"
    ),
    spool_dir: Optional[str] = typer.Option(None, "--spool-dir", help="default: ./mlruns/spool"),
    as_json: AsJson = False,
):
    """Replay MLflow records that wait in ./mlruns/spool (their store was unreachable or full) into their runs."""
    if spool_dir and Path(spool_dir).exists() and not Path(spool_dir).is_dir():
        raise OptionError(f"--spool-dir {spool_dir} is not a folder")
    rows = _replay_spools(Path(spool_dir) if spool_dir else default_spool_dir(), without_credentials(tracking_uri))
    left = [r for r in rows if r["status"] != "synced"]
    if as_json:
        views.print_json({"spools": rows, "left": len(left)})
    else:
        views.print_sync(rows, left)
    if left:  # after the listing: the exit status tells a script that records still wait
        raise UserError(f"{len(left)} spooled runs are still waiting (first: {left[0]['error']})")


def ui_command(
    port: int = typer.Option(5000, help="port to listen on (1-65535)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind; anything but loopback exposes your runs"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="default: the local store ./mlruns/mlflow.db"
    ),
):
    """Start the MLflow UI over the local store (127.0.0.1 by default); Ctrl+C stops it."""
    if not 1 <= port <= 65535:
        raise OptionError(f"--port must be between 1 and 65535, not {port}")
    uri = without_credentials(tracking_uri) or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise OptionError(f"{uri} is already an MLflow server: open it in a browser (hidrop ui serves local stores)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        views.warn_exposed(host)
    with progress.status("starting the MLflow UI..."):
        process = serve_ui(uri, host=host, port=port)
    views.print_ui_started(f"{ui_base_url(host, port)}/#/experiments{UI_TRAINING_VIEW}", redact_uri(uri))

    def stop(signum, frame):  # Ctrl+C or `kill`: stop the server and its workers, then exit cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_ui(process)
