"""`hidrop train`: a Ray TorchTrainer whose workers train with DeepSpeed, tracked in MLflow.

The driver validates the config, prepares the MLflow store once (concurrent workers must not race on a
new sqlite schema), and fits the trainer, listening to rank 0's news (progress, a stop) meanwhile; on
Ctrl+C it aborts the run and says where it stands, on a failure it says why in one line. Rank 0 logs; the
MLflow run id travels inside every checkpoint so a restarted worker group (FailureConfig) or a re-run with
the same name and storage path continues the SAME run. The workers are `hidrop_platform.train.worker`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

from hidrop.errors import UserError
from hidrop.models import ModelLoadError
from hidrop.schedule import first_error_line
from hidrop.training import Hook
from hidrop_platform.cluster.connect import ClusterSetupError, alive_nodes, check_fits, check_job_paths, start_ray
from hidrop_platform.config.credentials import tracking_credentials
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import EvalSetupError
from hidrop_platform.storage import StorageError, hold
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    TrackingUnavailable,
    check_tracking_uri,
    close_if_running,
    default_spool_dir,
    prepare_for,
)
from hidrop_platform.train.faults import fault_hooks
from hidrop_platform.train.recipe import mark_finished, run_folder
from hidrop_platform.train.resume import (
    ContinuationRefused,
    UnsafeCheckpoint,
    check_run_folder,
    newest_complete_checkpoint,
    prepare_run_folder,
    ray_checkpoints,
)
from hidrop_platform.train.turns import OverheadBenchError
from hidrop_platform.train.worker import WorkerNews, WorkerPayload, train_worker


class TrainSetupError(UserError, RuntimeError):
    """The run cannot start or failed for a reason the user can fix (one line for the CLI)."""


def connect_for_training(cfg: ExperimentConfig, restart: bool = False, force: bool = False) -> None:
    """Check the run folder (`check_run_folder`), reach Ray and check that the workers can ever be
    placed, before anything is written: a refused continuation or a cluster that cannot be reached or
    used leaves nothing behind. The CLI calls it before its progress bar and tells `run_training`
    (`connected=True`), which otherwise calls it itself."""
    t = cfg.train
    try:
        check_job_paths({"train.storage_path": t.storage_path}, cfg.tracking.uri, cfg.tracking.enabled)
        check_tracking_uri(cfg.tracking.uri, cfg.tracking.enabled)
        check_run_folder(run_folder(cfg), cfg.model_dump(mode="json"), restart, force)
        start_ray(t.ray_address, "train.ray_address")
        check_fits("train.resources_per_worker", worker_bundle(t), t.num_workers, alive_nodes())
    except (ClusterSetupError, TrackingUnavailable, ContinuationRefused, StorageError) as e:
        raise TrainSetupError(str(e)) from None


def run_training(
    cfg: ExperimentConfig,
    progress: Optional[Callable[[dict], None]] = None,
    hooks: Sequence[Hook] = (),
    restart: bool = False,
    force: bool = False,
    connected: bool = False,
) -> dict:
    """Run the Ray Train job; `progress(info)` is called about once a second with rank 0's latest step.
    A run of the same name in `train.storage_path` is continued only when its config agrees
    (`hidrop_platform.train.resume`); `restart` moves it aside, `force` continues it with the new config.
    `hooks` join every worker's loop (the overhead benchmark's turn-taking); the test faults of
    `hidrop_platform.train.faults` join them when their environment variable asks. One driver at a time
    per run: a second is refused while the first runs."""
    if not connected:
        connect_for_training(cfg, restart, force)
    folder = run_folder(cfg)
    try:
        with hold(folder, f"training {cfg.name!r}"):
            return _run_held(cfg, folder, progress, hooks, restart, force)
    except StorageError as e:
        raise TrainSetupError(str(e)) from None


def _run_held(
    cfg: ExperimentConfig,
    folder: Path,
    progress: Optional[Callable[[dict], None]],
    hooks: Sequence[Hook],
    restart: bool,
    force: bool,
) -> dict:
    """`run_training` once this process holds the run's folder."""
    from ray.util.queue import Queue

    with _ctrl_c_as_event() as ctrl_c:  # Ctrl+C is handled below, not wherever it happens to land
        uri, experiment = prepare_for(cfg, "training")
        try:
            continued = prepare_run_folder(folder, cfg.model_dump(mode="json"), restart=restart, force=force)
        except ContinuationRefused as e:
            raise TrainSetupError(str(e)) from None
        start = time.perf_counter()
        done, stopped, heard, outcome = threading.Event(), [], {}, {}
        news = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        trainer = _trainer(cfg, folder, uri, experiment, hooks, news)
        listener = threading.Thread(target=_listen, args=(news, progress, done, stopped, heard), daemon=True)
        listener.start()
        # Ray Train handles SIGINT itself when fit() runs in the main thread (it aborts and exits without a
        # word); in a thread of its own it does not, so Ctrl+C reaches us and we can say where the run stands
        fitting = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True, name="hidrop-fit")
        if not ctrl_c.is_set():
            fitting.start()
        while fitting.is_alive() and not ctrl_c.is_set():
            fitting.join(timeout=0.2)
        if ctrl_c.is_set():
            _stop_fit(heard, fitting)
        done.set()
        listener.join(timeout=10)  # then `heard` holds the last step rank 0 reported
        interrupted = _interrupted(cfg, folder, uri, heard) if ctrl_c.is_set() else None
    if interrupted is not None:
        # the queue goes with Ray's shutdown (or with this driver, on a cluster); no Ray handle may outlive
        # this frame: one freed after Ray's shutdown (the CLI's stop_ray) makes Ray end the process
        news = trainer = None
        heard.pop("controller", None)
        raise TrainInterrupted(interrupted)
    with contextlib.suppress(Exception):
        news.shutdown(force=True)
    if "error" in outcome:  # WorkerGroupError carries each failed worker's exception
        raise TrainSetupError(_failure_message(outcome["error"]))
    result = outcome["result"]
    if stopped:
        raise TrainSetupError(stopped[0].strip())
    removed = _remove_orphans(folder, result)
    metrics = dict(result.metrics or {})
    mark_finished(cfg, int(metrics.get("step", 0)))  # a recipe's next stage may start from this one
    return {
        "experiment": cfg.name,
        "wall_time_s": time.perf_counter() - start,
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(folder / "export" / "final"),
        "tracking_uri": uri,
        "continued": continued,
        "orphaned_checkpoints_removed": removed,
    }


def _trainer(cfg: ExperimentConfig, folder: Path, uri: str, experiment: str, hooks: Sequence[Hook], news):
    """The TorchTrainer of this fit: `train_worker` on every worker, its payload, scaling and run config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "payload": WorkerPayload(
                config=cfg.model_dump(mode="json"),
                tracking_uri=uri,
                experiment=experiment,
                export_dir=str(folder / "export"),
                spool_dir=str(default_spool_dir()),
                hooks=[*hooks, *fault_hooks()],
                news=news,
                credentials=tracking_credentials(),
                fit_id=uuid.uuid4().hex,
            )
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=t.resources_per_worker
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(folder.parent),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[_controller_reporter(news)],
        ),
    )


def _stop_fit(heard: dict, fitting: threading.Thread) -> None:
    """After Ctrl+C: end the fit, so that no thread of it is inside Ray when Ray shuts down."""
    import ray

    # Ray's own graceful abort (the workers stop, fit returns) once workers run; a run still waiting for
    # its workers has nothing to save, and its controller answers only once they are placed, so it is
    # killed (fit returns at once). A controller that has not reported itself yet is waited for: a fit
    # thread still inside Ray at shutdown makes Ray end the process with status 1.
    controller = _wait_for_controller(heard, fitting, CONTROLLER_WAIT_S)
    started = heard.get("run_id") is not None or heard.get("step") is not None
    if controller is not None:
        with contextlib.suppress(Exception):
            if started:
                ray.get(controller.abort.remote(), timeout=60)
            else:
                ray.kill(controller, no_restart=True)
        fitting.join(timeout=60)


@contextlib.contextmanager
def _ctrl_c_as_event():
    """Ctrl+C (and any repeat of it: the stop must not be cut short) sets the yielded event instead of
    raising KeyboardInterrupt wherever it lands. Only the main thread receives signals; elsewhere the
    event is never set."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


CONTROLLER_WAIT_S = 60.0  # a busy machine may take a while to start the controller's process


def _wait_for_controller(heard: dict, fitting: threading.Thread, timeout: float):
    """The controller's handle once the listener has heard it, or None if the fit ended (or `timeout`
    passed) first."""
    deadline = time.monotonic() + timeout
    while heard.get("controller") is None and fitting.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return heard.get("controller")


def worker_bundle(t) -> dict[str, float]:
    """What Ray Train reserves on one node for each worker: resources_per_worker, plus one GPU with
    use_gpu when the request names none."""
    bundle = {k: float(v) for k, v in t.resources_per_worker.items()}
    if t.use_gpu and "GPU" not in bundle:
        bundle["GPU"] = 1.0
    return bundle


def _controller_reporter(news):
    """A Ray Train controller callback that sends the controller's actor handle to the driver, which
    aborts the run through it on Ctrl+C (what Ray's own SIGINT handler does in the main thread). Ray's
    callback interface for this is internal (ray.train.v2._internal): it is used here only."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ReportController(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            with contextlib.suppress(Exception):
                news.put(WorkerNews(controller=ray.get_runtime_context().current_actor), timeout=10)

    return ReportController()


def _fit(trainer, outcome: dict) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as e:  # noqa: BLE001 - handed to the main thread, which reports it
        outcome["error"] = e


class TrainInterrupted(RuntimeError):
    """Ctrl+C: the message says where the run stands and how to continue it."""


def _interrupted(cfg: ExperimentConfig, folder: Path, uri: str, heard: dict) -> str:
    """Mark the MLflow run KILLED (tagged with its last step) and say where the last checkpoint is."""
    step = heard.get("step")
    run_id = heard.get("run_id")
    if run_id and cfg.tracking.enabled:
        tags = {N.STATUS: N.INTERRUPTED, **({N.INTERRUPTED_AT_STEP: step} if step is not None else {})}
        with contextlib.suppress(Exception):  # an unreachable store must not hide the message
            close_if_running(uri, run_id, "KILLED", tags)
    last = newest_complete_checkpoint(folder)  # what `_resume` picks, so the step named is the one resumed
    if last:
        where = f"the last checkpoint (step {last[1]}) is {last[0]}; re-run the same command to continue from it"
    elif ray_checkpoints(folder):  # a run from before completion marks: Ray picks its latest
        where = "re-run the same command to continue from the last checkpoint Ray registered, if any"
    else:
        where = "no checkpoint was written yet; a re-run starts from the beginning"
    run = f"MLflow run {run_id} is marked KILLED" if run_id else "no MLflow run was started yet"
    at = f" at step {step}" if step is not None else ""
    return f"training {cfg.name!r} interrupted{at}: {run}; {where}"


def _remove_orphans(folder: Path, result) -> list[str]:
    """Checkpoints on disk that Ray does not keep (written just before a worker died, before Ray
    registered them): they would outlive keep_checkpoints forever."""
    kept = {Path(c.path).resolve() for c, _ in (getattr(result, "best_checkpoints", None) or [])}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).resolve())
    if not kept:
        return []
    removed = []
    for path in ray_checkpoints(folder):  # Ray's names only: nothing else in the folder is ours to delete
        if path.resolve() not in kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _listen(
    news, progress: Optional[Callable[[dict], None]], done: threading.Event, stopped: list, heard: dict
) -> None:
    """Rank 0's news until the fit ends, then whatever is left in the queue; `heard` keeps the run id
    and the latest step (what an interruption reports)."""
    from ray.util.queue import Empty

    while True:
        try:
            item = news.get(timeout=1.0)
        except Empty:
            if done.is_set():
                return
            continue
        except Exception:  # the queue actor went away (Ctrl+C): nothing more will come
            return
        if item.run_id is not None:
            heard["run_id"] = item.run_id
        if item.controller is not None:
            heard["controller"] = item.controller
        if item.stopped is not None:
            stopped.append(item.stopped)
        elif item.progress is not None:
            heard["step"] = item.progress.get("step")
            if progress is not None:
                try:
                    progress(item.progress)
                except Exception:  # a broken progress display must not swallow a later stop message
                    progress = None


def _failure_message(e: BaseException) -> str:
    """One line for the user: a failed worker's own message when it is a mistake they can fix (a setup
    error, a bad value), else the last line of Ray's report."""

    from pydantic import ValidationError

    user_errors = (TrainSetupError, EvalSetupError, ModelLoadError, OverheadBenchError, UnsafeCheckpoint, ValueError)
    for failure in getattr(e, "worker_failures", {}).values():
        if isinstance(failure, ValidationError):  # its first line names only the model
            return first_error_line(failure)
        if isinstance(failure, user_errors) and str(failure).strip():
            return str(failure).strip().splitlines()[0]
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
