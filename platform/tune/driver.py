"""`hidrop tune`'s driver: Ray Tune over vision-token schedules, one MLflow run per trial under a parent run.

A trial's config is the experiment's YAML with a few dotted names overridden (the `tune.space` sample,
or a seed schedule), validated exactly like `hidrop eval` would validate it. Invalid samples are
rejected by the searcher before they become trials (and counted, with their reasons). The unpruned
reference is evaluated once per sweep, so a training-free trial runs only its own schedule.

Layout of a sweep folder (`tune.storage_path/<name>`): Ray Tune's experiment state, plus
`sweep.json` (the parent MLflow run), `reference.json` (the all-tokens scores) and `trial_runs/`
(one record per point, label + sampled overrides -> MLflow run id and, once done, its result: a
retried or resumed trial logs into the same run, and a finished point is never evaluated twice).

This module runs in the driver process: it checks the space, the cluster and the sweep folder, holds the
folder, opens the parent run and runs the Tuner; the other modules of this package hold the pieces.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from hidrop_platform.cluster.connect import ClusterSetupError, alive_nodes, check_fits, check_job_paths, start_ray
from hidrop_platform.config.credentials import tracking_credentials
from hidrop_platform.config.loader import flatten, validate_config
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.storage import StorageError, claim, hold
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    TrackingUnavailable,
    check_tracking_uri,
    close_if_running,
    default_spool_dir,
    prepare_for,
)
from hidrop_platform.tracking.tracker import Tracker
from hidrop_platform.tune.confirm import check_confirm, confirm_into
from hidrop_platform.tune.credentials import share_credentials
from hidrop_platform.tune.errors import TuneSetupError
from hidrop_platform.tune.reference import log_reference, sweep_reference
from hidrop_platform.tune.results import best_under_budget, log_summary, sweep_summary
from hidrop_platform.tune.scheduler import ParetoHalving
from hidrop_platform.tune.searcher import ScheduleSearcher, valid_share
from hidrop_platform.tune.summary import SweepReference, SweepResult
from hidrop_platform.tune.trial import TrialContext, run_trial
from hidrop_platform.tune.trial_runs import RUN_ID_KEY

SWEEP_FILE = "sweep.json"


class SweepInterrupted(KeyboardInterrupt):
    """Tune stopped early (Ctrl+C, SIGTERM): its state is saved and `--resume` continues it."""


# ---- checks before anything starts -------------------------------------------------------------


def _check_space(base: dict, cfg: ExperimentConfig) -> float:
    """The share of random samples of the space that are valid schedules; refuses a space with none."""
    share, reasons = valid_share(base, cfg) if cfg.tune.algorithm != "grid" else (1.0, Counter())
    if share == 0.0:
        raise TuneSetupError(
            f"tune.space: none of 300 random samples is a valid schedule (most often: "
            f"{reasons.most_common(1)[0][0]}); widen or fix the ranges"
        )
    return share


def _check_resume(sweep_dir: Path, name: str, resume: bool) -> None:
    """`--resume` needs Tune state in the sweep folder, and a new sweep must not overwrite one."""
    can_restore = tune.Tuner.can_restore(str(sweep_dir)) if sweep_dir.exists() else False
    if resume and not can_restore:
        raise TuneSetupError(f"nothing to resume at {sweep_dir} (no Tune state there)")
    if not resume and can_restore:
        raise TuneSetupError(
            f"sweep {name!r} already exists at {sweep_dir}: pass --resume to continue it, "
            "or set tune.name=... for a new one"
        )


def _check_resources(cfg: ExperimentConfig, nodes: list[dict]) -> tuple[int, float]:
    """(trials that fit at once, devices per trial); raises when a trial can never be placed: each trial
    is one bundle, so it must fit on a single node, not merely in the cluster's total."""
    wanted = {k: float(v) for k, v in cfg.tune.resources_per_trial.items() if float(v) > 0}
    if not wanted:
        raise TuneSetupError("tune.resources_per_trial asks for nothing; give at least CPU")
    try:
        at_once = check_fits("tune.resources_per_trial", wanted, 1, nodes)
    except ClusterSetupError as e:
        raise TuneSetupError(f"{e}; no trial could ever start") from None
    devices = wanted.get("GPU", 1.0)
    return (min(at_once, cfg.tune.max_concurrent) if cfg.tune.max_concurrent else at_once), devices


def connect_for_tune(cfg: ExperimentConfig, resume: bool = False) -> tuple[int, float]:
    """Reach Ray and check that a trial can ever be placed; returns `_check_resources`. The CLI calls it
    before its progress bar and hands the result to `run_tune`, which otherwise calls it itself. A
    `--resume` with nothing to resume is said first: it needs no cluster."""
    name = cfg.tune.name or cfg.name
    _check_resume(Path(cfg.tune.storage_path).resolve() / name, name, resume)
    try:
        check_job_paths({"tune.storage_path": cfg.tune.storage_path}, cfg.tracking.uri, cfg.tracking.enabled)
        check_tracking_uri(cfg.tracking.uri, cfg.tracking.enabled)
        start_ray(cfg.tune.ray_address, "tune.ray_address")
        return _check_resources(cfg, alive_nodes())
    except (ClusterSetupError, TrackingUnavailable) as e:
        raise TuneSetupError(str(e)) from None


# ---- the sweep ---------------------------------------------------------------------------------


def run_tune(
    cfg: ExperimentConfig,
    base: dict,
    resume: bool = False,
    progress: Optional[Callable[[str, int, int], None]] = None,
    placement: Optional[tuple[int, float]] = None,
) -> SweepResult:
    """Run (or resume) the sweep; returns every trial, the Pareto front and where the seeds sit. One
    driver at a time per sweep: a second is refused while the first runs. `placement`: what
    `connect_for_tune` returned, when the caller already connected."""
    name = cfg.tune.name or cfg.name
    sweep_dir = Path(cfg.tune.storage_path).resolve() / name
    share = _check_space(base, cfg)
    at_once, devices = placement or connect_for_tune(
        cfg, resume
    )  # before the parent run: a failure here leaves nothing behind
    try:
        with hold(sweep_dir, f"sweep {name!r}"):
            _check_resume(sweep_dir, name, resume)  # again: a twin started beside us may have finished since
            claim(sweep_dir, "sweep", legacy=[SWEEP_FILE])
            return _run_held(cfg, base, resume, progress, sweep_dir, share, at_once, devices)
    except StorageError as e:
        raise TuneSetupError(str(e)) from None


def _run_held(
    cfg: ExperimentConfig,
    base: dict,
    resume: bool,
    progress: Optional[Callable[[str, int, int], None]],
    sweep_dir: Path,
    share: float,
    at_once: int,
    devices: float,
) -> SweepResult:
    """`run_tune` once this process holds the sweep's folder: the reference, the Tuner, the summary."""
    name = sweep_dir.name
    note = (lambda msg: progress(msg, 0, 0)) if progress else None
    parent, cfg, base = _open_parent(cfg, base, name, sweep_dir, resume)
    s = cfg.tune
    try:
        reference = sweep_reference(cfg, sweep_dir, note)
        if s.confirm is not None:
            check_confirm(cfg, reference)  # before any trial: a confirmation that cannot run fails now
        log_reference(parent, reference, sweep_dir)
        credentials_from, _holder = share_credentials(tracking_credentials())  # the actor lives while _holder does
        ctx = _trial_context(cfg, base, reference, parent, sweep_dir, devices, credentials_from)
        searcher = ScheduleSearcher(base, cfg)
        callback = _ProgressAndRunCloser(progress, searcher.total_trials, ctx)
        tuner = _tuner(cfg, ctx, searcher, callback, at_once, resume)
        start = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - start
        live = _searcher_of(tuner) or searcher
        if len(grid) < live.total_trials or grid.num_terminated + grid.num_errors < len(grid):
            raise SweepInterrupted(f"{grid.num_terminated + grid.num_errors} of {live.total_trials} trials finished")
        rungs = s.fidelity.rungs if s.fidelity else None
        summary = sweep_summary(grid, reference, live, name, at_once, wall, ctx.sweep_dir, rungs)
        summary.valid_share = share
        if s.confirm is not None:
            confirm_into(summary, cfg, base, reference, parent, note)
        if s.objective == "score":
            summary.best_under_budget = best_under_budget(summary.trials, s.max_vision_tflops, rungs)
        log_summary(parent, summary, sweep_dir, name, reference)
        parent.set_tags({N.STATUS: N.FINISHED})
        parent.finish("FINISHED")
        summary.parent_run_id, summary.tracking_uri = parent.run_id, parent.tracking_uri
        summary.sweep_dir = str(sweep_dir)
        return summary
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not cut the bookkeeping short
        parent.set_tags({N.STATUS: N.INTERRUPTED if interrupted else N.FAILED})
        parent.finish("KILLED" if interrupted else "FAILED")
        raise


def _open_parent(cfg: ExperimentConfig, base: dict, name: str, sweep_dir: Path, resume: bool):
    """The sweep's parent MLflow run, created once and found again on resume (with the config the sweep
    started with); returns it with that config."""
    uri, experiment = prepare_for(cfg, "the sweep")
    sweep_file = sweep_dir / SWEEP_FILE
    sweep_state = json.loads(sweep_file.read_text()) if sweep_file.is_file() else {}
    if resume and "base" in sweep_state:  # a resumed sweep keeps the config it started with
        base = sweep_state["base"]
        cfg = validate_config(base, str(sweep_file))
    parent = Tracker(
        uri,
        experiment,
        run_id=sweep_state.get("parent_run_id"),
        run_name=f"sweep:{name}",
        spool_dir=str(default_spool_dir()),
        enabled=cfg.tracking.enabled,
        tags={N.SWEEP: name, N.KIND: N.KIND_SWEEP},
    ).start()
    sweep_state.update(parent_run_id=parent.run_id, name=name, base=base)
    sweep_file.write_text(json.dumps(sweep_state, indent=2))
    if not resume:
        parent.log_params({k: v for k, v in flatten(cfg).items()})
        parent.log_config(cfg)
    return parent, cfg, base


def _trial_context(
    cfg: ExperimentConfig,
    base: dict,
    reference: SweepReference,
    parent,
    sweep_dir: Path,
    devices: float,
    credentials_from: Optional[str],
) -> TrialContext:
    """What every trial of this sweep is shipped."""
    resources = cfg.tune.resources_per_trial
    return TrialContext(
        base=base,
        reference=reference,
        sweep_dir=str(sweep_dir),
        sweep=sweep_dir.name,
        tracking_uri=parent.tracking_uri,
        experiment=parent.experiment,
        parent_run_id=parent.run_id,
        tracking=cfg.tracking.enabled,
        spool_dir=str(parent.spool_path.parent),
        threads=resources.get("CPU", 1),
        devices_per_trial=devices,
        device_type="gpu" if resources.get("GPU", 0) > 0 else "cpu",
        credentials_from=credentials_from,
    )


def _tuner(cfg: ExperimentConfig, ctx: TrialContext, searcher, callback, at_once: int, resume: bool):
    """Tune's Tuner over `run_trial` (restored from the sweep folder on resume); ASHA for trained trials."""
    s = cfg.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx),
        {k.lower() if k in ("CPU", "GPU") else k: v for k, v in s.resources_per_trial.items()},
    )
    if resume:
        return tune.Tuner.restore(ctx.sweep_dir, trainable=trainable, resume_errored=True)
    scheduler = None
    if s.fidelity is not None:
        scheduler = ParetoHalving(
            s.fidelity.rungs,
            s.fidelity.factor,
            s.fidelity.promote_seeds,
            by_score=s.objective == "score",
            promotion=s.fidelity.promotion,
            ceiling=ctx.reference.vision_tflops,
        )
    if s.kind == "trained":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=N.RELATIVE_SCORE,
            mode="max",
            max_t=math.ceil(s.train_steps / s.eval_every),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=searcher.total_trials,
            scheduler=scheduler,
            max_concurrent_trials=at_once,
            reuse_actors=s.kind == "training_free",
        ),
        run_config=tune.RunConfig(
            name=ctx.sweep,
            storage_path=str(Path(ctx.sweep_dir).parent),
            verbose=0,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
        ),
    )


class _ProgressAndRunCloser(Callback):
    """Counts finished trials for the CLI's bar, and ends the MLflow run of a trial stopped from outside
    (ASHA stops a trained trial's actor: its own code never gets to end the run). Tune pickles its run
    config: the bar is not carried. Sweeps saved before the rename pickled it as `_ProgressCallback`."""

    def __init__(
        self, progress: Optional[Callable[[str, int, int], None]], total: int, ctx: Optional[TrialContext] = None
    ):
        self.progress, self.total, self.done, self.ctx = progress, total, 0, ctx

    def __getstate__(self) -> dict:
        return {"progress": None, "total": self.total, "done": 0, "ctx": self.ctx}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self._close_run(trial)
        if self.progress:
            self.progress(trial.config.get("label", trial.trial_id), self.done, self.total)

    def _close_run(self, trial) -> None:
        if not self.ctx or not self.ctx.tracking:
            return
        run_id = (trial.last_result or {}).get(RUN_ID_KEY)
        if run_id:  # still running here means stopped early after a reported evaluation
            close_if_running(self.ctx.tracking_uri, run_id, "FINISHED", {N.STATUS: N.STOPPED_EARLY})

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)


def _searcher_of(tuner) -> Optional[ScheduleSearcher]:
    """The searcher Tune actually used (a restored tuner carries its own copy)."""
    try:
        alg = tuner._local_tuner._tune_config.search_alg  # the only way to read the restored one's counts
    except AttributeError:
        return None
    return alg if isinstance(alg, ScheduleSearcher) else None
