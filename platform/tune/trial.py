"""One trial of a sweep, as it runs in its Ray actor: the shared `TrialContext`, `run_trial` (Tune's
function trainable: build the trial config, train or evaluate, report to Tune, log to the trial's own
MLflow run under the sweep's parent run), and the three ways a trial is measured: evaluated once,
evaluated in rungs of growing question sets, or finetuned and evaluated every `eval_every` steps."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import ray
import torch
from ray import tune

from hidrop.evaluation.harness import Known, known_records
from hidrop.evaluation.results import EvalReport
from hidrop.evaluation.subsets import rung_select
from hidrop.training import Hook, StepEnd, TrainingLoop, make_dataset, plain_training
from hidrop_platform.config.loader import flatten
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import (
    benchmarks_for,
    blind_score,
    build_model,
    evaluate_schedule,
    log_records,
    score_metrics,
)
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.params import schedule_params
from hidrop_platform.tracking.tracker import Tracker
from hidrop_platform.train.faults import fail_trial_if_asked, wait_at_trial_barrier
from hidrop_platform.train.worker import training_samples
from hidrop_platform.tune.credentials import fetch_credentials
from hidrop_platform.tune.reference import stored_known
from hidrop_platform.tune.space import trial_config
from hidrop_platform.tune.summary import SweepReference
from hidrop_platform.tune.trial_runs import RUN_ID_KEY, TrialRun


@dataclasses.dataclass
class TrialContext:
    """What every trial of a sweep shares (Tune ships it to each trial through `with_parameters`)."""

    base: dict  # the experiment's raw config; a trial applies its overrides to it
    reference: SweepReference  # the sweep's unpruned and blind scores (`reference.sweep_reference`)
    sweep_dir: str
    sweep: str
    tracking_uri: str
    experiment: str
    parent_run_id: Optional[str]
    tracking: bool
    spool_dir: str
    threads: float
    devices_per_trial: float
    device_type: str
    # the name of the actor that hands out MLflow basic auth (`credentials.share_credentials`); never the
    # secret itself, since Tune pickles this context into the sweep folder (tuner.pkl holds the progress callback)
    credentials_from: Optional[str] = None


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune's function trainable: build the trial config, (train,) evaluate, report, log to MLflow."""
    torch.set_num_threads(max(1, int(ctx.threads)))
    os.environ.update(fetch_credentials(ctx.credentials_from))  # MLflow reads basic auth from there
    cfg = trial_config(ctx.base, config["overrides"])
    record = TrialRun.read(ctx.sweep_dir, config)
    if record.result is not None:
        # finished before an interruption or a crash that Tune's saved state did not see: report it
        # again, do not run it again
        _report(record.result, record.run_id)
        return
    record.attempts += 1
    tracker = _start_run(ctx, config, record.run_id)
    record.run_id = tracker.run_id or record.run_id
    record.write()
    schedule = cfg.main_schedule
    start = time.perf_counter()
    reported: dict = {}  # the last evaluation it reported to Tune mid-trial (rungs, trained)
    try:
        tracker.set_tags({N.ATTEMPTS: record.attempts, N.STATUS: N.RUNNING})
        tracker.log_params(_trial_params(cfg, config, schedule))
        wait_at_trial_barrier(config["label"])
        fail_trial_if_asked(config["label"], record.attempts)
        metrics = _measure(cfg, ctx, tracker, start, reported)
        # the result is kept before Tune hears of it: a trial Tune's saved state still calls running
        # after an interruption is then reported again on resume, not evaluated again
        record.run_id, record.result = tracker.run_id or record.run_id, metrics
        record.write()
        tracker.set_tags({N.STATUS: N.FINISHED})
        tracker.finish("FINISHED")
    except (KeyboardInterrupt, SystemExit):  # the sweep was interrupted, or ASHA stopped a trained trial
        if reported:  # it has evaluated results: stopping early is an outcome, not a failure
            tracker.set_tags({N.STATUS: N.STOPPED_EARLY})
            tracker.finish("FINISHED")
        else:
            tracker.set_tags({N.STATUS: N.STOPPED})
            tracker.finish("KILLED")
        raise
    except BaseException as e:
        tracker.set_tags({N.STATUS: N.FAILED, N.ERROR: str(e).splitlines()[0][:500] if str(e) else type(e).__name__})
        tracker.finish("FAILED")
        raise
    if cfg.tune.kind != "trained" and cfg.tune.fidelity is None:  # the others reported after every evaluation
        _report(metrics, record.run_id)  # outside the try: Tune stopping the sweep here does not undo a finished run


def _start_run(ctx: TrialContext, config: dict, run_id: Optional[str]) -> Tracker:
    """The trial's MLflow run under the sweep's parent: `run_id` again when an earlier attempt made it."""
    return Tracker(
        ctx.tracking_uri,
        ctx.experiment,
        run_id=run_id,
        run_name=config["label"],
        parent_run_id=ctx.parent_run_id,
        spool_dir=ctx.spool_dir,
        enabled=ctx.tracking,
        tags={
            N.KIND: N.KIND_TRIAL,
            N.SWEEP: ctx.sweep,
            N.TRIAL_ID: tune.get_context().get_trial_id(),
            N.SEED: str(config["seed"]),
            N.DEVICE_TYPE: ctx.device_type,
            N.RAY_NODE: ray.get_runtime_context().get_node_id(),
        },
    ).start()


def _trial_params(cfg: ExperimentConfig, config: dict, schedule) -> dict:
    """The trial run's params: its config (less `tune.*`), its sampled values, and its schedule's."""
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")}
    params.update({f"{N.SEARCH}{k}": v for k, v in config["overrides"].items()})
    params.update({**schedule_params(schedule), N.DROP_LAYERS: [d.after_layer for d in schedule.drops]})
    return params


def _measure(cfg: ExperimentConfig, ctx: TrialContext, tracker, start: float, reported: dict) -> dict:
    """The trial's final metrics: finetuned and evaluated, evaluated in rungs, or evaluated once."""
    devices = float(ctx.devices_per_trial)
    if cfg.tune.kind == "trained":
        return _train_and_evaluate(cfg, ctx, tracker, start, devices, reported)
    if cfg.tune.fidelity is not None:
        return _evaluate_in_rungs(cfg, ctx, tracker, start, devices, reported)
    metrics, _ = _evaluate(cfg, _trial_model(cfg, fresh=False), ctx.reference, benchmarks_for(cfg), tracker)
    metrics.update(_elapsed(start, devices))
    tracker.log_metrics(metrics, step=0)
    return metrics


def _elapsed(start: float, devices: float) -> dict:
    """The trial's wall time so far and the accelerator hours it held."""
    wall = time.perf_counter() - start
    return {N.WALL_S: wall, N.ACCELERATOR_HOURS: wall * devices / 3600}


def _log_and_report(tracker, metrics: dict, step: int, reported: dict) -> None:
    """An evaluation mid-trial: into the trial's run, kept in `reported`, then to Tune, whose scheduler
    may stop the trial right here."""
    tracker.log_metrics(metrics, step=step)
    reported.update(metrics)
    _report(metrics, tracker.run_id)


def _report(metrics: dict, run_id: Optional[str]) -> None:
    """A result to Tune, carrying the trial's MLflow run id: the progress callback and the sweep's
    summary read it from there, not from the trial's record."""
    tune.report({**metrics, **({RUN_ID_KEY: run_id} if run_id else {})})


_MODEL_CACHE: dict[str, Any] = {}  # training-free trials in a reused actor share the loaded model


def _trial_model(cfg: ExperimentConfig, fresh: bool):
    """The trial's model: a fresh one to finetune, else the one this actor already loaded for the same
    model and seed."""
    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.seed])
    if fresh:
        return build_model(cfg)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(cfg)
    return _MODEL_CACHE[key]


def _evaluate(
    cfg: ExperimentConfig,
    vlm,
    reference: SweepReference,
    benches: list,
    tracker,
    own: Optional[Known] = None,
    select=None,
) -> tuple[dict, EvalReport]:
    """Metrics of the trial's schedule on `benches`, paired with the sweep's stored reference and blind
    records (interval, blind level); its own per-question records go to the trial's run. `own`: its
    records from earlier rungs (never scored again); `select`: this rung's questions."""
    schedule = cfg.main_schedule
    known = {**stored_known(reference, schedule), **(own or {})}
    report = evaluate_schedule(cfg, vlm, schedule, benches, known=known, select=select)
    row = report.row_for(schedule)
    log_records(tracker, report, methods=[row.method])  # the stored reference rows are the sweep's
    metrics = {
        **score_metrics(report, schedule),
        N.AVG_VISION_TOKENS: row.avg_vision_tokens,
        N.VISION_TFLOPS: row.vision_tflops,
        N.MODEL_TFLOPS: row.model_tflops,
        N.SAMPLES: report.samples_evaluated,
        N.QUESTIONS_RUN: report.questions_run or 0,
    }
    if row.measured_avg_vision_tokens is not None:
        metrics[N.MEASURED_AVG_VISION_TOKENS] = row.measured_avg_vision_tokens
    if N.BLIND_LEVEL in metrics:
        tracker.set_tags({N.BLIND_LEVEL_TAG: str(bool(metrics[N.BLIND_LEVEL]))})
    return metrics, report


def _evaluate_in_rungs(
    cfg: ExperimentConfig, ctx: TrialContext, tracker, start: float, devices: float, reported: dict
) -> dict:
    """A training-free trial in rungs of growing, nested question sets, reported to Tune after each (its
    `ParetoHalving` scheduler stops the ones that fall behind); each rung scores only its new questions."""
    f = cfg.tune.fidelity
    vlm = _trial_model(cfg, fresh=False)
    benches = benchmarks_for(cfg)
    own: Known = {}
    questions = 0
    metrics: dict = {}
    for rung in range(1, f.rungs + 1):
        select = rung_select(rung, f.rungs, f.factor, cfg.seed)
        metrics, report = _evaluate(cfg, vlm, ctx.reference, benches, tracker, own=own, select=select)
        row = report.row_for(cfg.main_schedule)
        own = known_records(report, [row.method])
        questions += report.questions_run or 0
        metrics.update({N.RUNG: rung, N.QUESTIONS_RUN: questions, **_elapsed(start, devices)})
        blind = blind_score(report)
        if blind is not None:  # the scheduler's floor: blind on this rung's questions
            metrics[N.BLIND_RELATIVE] = blind
        _log_and_report(tracker, metrics, rung, reported)  # ParetoHalving may stop the trial here
    return metrics


def _train_and_evaluate(
    cfg: ExperimentConfig, ctx: TrialContext, tracker, start: float, devices: float, reported: dict
) -> dict:
    """A short finetune with the schedule active, evaluated every `eval_every` steps (ASHA stops the
    weak ones early). Single process: nesting Ray Train groups inside trials leaks placement groups
    when ASHA stops them (ray-project/ray#54305)."""
    t = cfg.train
    vlm = _trial_model(cfg, fresh=True)
    data = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
    align_projector(cfg, vlm, data, tracker)
    hook = _EvalEvery(cfg, vlm, ctx.reference, tracker, start, devices, reported)
    plain_training(vlm, cfg.main_schedule, data, t, steps=cfg.tune.train_steps, seed=cfg.seed, hooks=[hook])
    return hook.metrics


def align_projector(cfg: ExperimentConfig, vlm, data, tracker) -> None:
    """Stage 1 of a trained trial (`tune.align_steps`, 0: none): the projector alone trains with the trial's
    schedule active, so an image injected at a deeper layer arrives in a form that layer reads (the paper
    trains both stages with the schedule active); the LM stays frozen, its loss goes to `align_loss`."""
    steps = cfg.tune.align_steps
    if not steps:
        return
    recipe = cfg.train.model_copy(update={"stage": "pretrain", "lora": None, "lr": cfg.tune.align_lr})
    hook = _LogLoss(tracker, N.ALIGN_LOSS)
    plain_training(vlm, cfg.main_schedule, data, recipe, steps=steps, seed=cfg.seed, hooks=[hook])


class _LogLoss(Hook):
    def __init__(self, tracker, key: str):
        self.tracker, self.key = tracker, key

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        self.tracker.log_metrics({self.key: step.loss}, step=step.step)


class _EvalEvery(Hook):
    """A trained trial's loss every step, and every `eval_every` steps its scores, reported to Tune."""

    def __init__(
        self, cfg: ExperimentConfig, vlm, reference: SweepReference, tracker, start: float, devices: float, reported
    ):
        self.cfg, self.vlm, self.reference, self.tracker = cfg, vlm, reference, tracker
        self.start, self.devices, self.reported = start, devices, reported
        self.benches = benchmarks_for(cfg)  # built once: the trial evaluates every eval_every steps
        self.metrics: dict = {}

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        self.tracker.log_metrics({N.LOSS: step.loss}, step=step.step)
        if step.step % self.cfg.tune.eval_every and step.step != step.total:
            return
        metrics, _ = _evaluate(self.cfg, self.vlm, self.reference, self.benches, self.tracker)
        metrics.update({N.TRAIN_STEP: step.step, N.LOSS: step.loss, **_elapsed(self.start, self.devices)})
        self.metrics = metrics
        _log_and_report(self.tracker, metrics, step.step, self.reported)  # ASHA may stop the trial here
