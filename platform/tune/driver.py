"""`hidrop tune`: Ray Tune over vision-token schedules, one MLflow run per trial under a parent run.

A trial's config is the experiment's YAML with a few dotted names overridden (the `tune.space` sample,
or a seed schedule), validated exactly like `hidrop eval` would validate it. Invalid samples are
rejected by the searcher before they become trials (and counted, with their reasons). The unpruned
reference is evaluated once per sweep, so a training-free trial runs only its own schedule.

Layout of a sweep folder (`tune.storage_path/<name>`): Ray Tune's experiment state, plus
`sweep.json` (the parent MLflow run), `reference.json` (the all-tokens scores) and `trial_runs/`
(one record per point, label + sampled overrides -> MLflow run id and, once done, its result: a
retried or resumed trial logs into the same run, and a finished point is never evaluated twice).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

from hidrop.cost import cost_report
from hidrop.errors import UserError
from hidrop.evaluation.harness import REFERENCE, EvalError, Known, known_records
from hidrop.evaluation.registry import get_benchmark
from hidrop.evaluation.results import EvalReport, QuestionRecord
from hidrop.evaluation.subsets import rung_select, unseen_select
from hidrop.evaluation.uncertainty import format_interval
from hidrop.schedule import ScheduleSpec
from hidrop.training import Hook, StepEnd, TrainingLoop, make_dataset, plain_training
from hidrop_platform.cluster.connect import ClusterSetupError, alive_nodes, check_fits, check_job_paths, start_ray
from hidrop_platform.config.schema import (
    ConfigError,
    ExperimentConfig,
    flatten,
    tracking_credentials,
    validate_config,
    with_overrides,
)
from hidrop_platform.evaluate.runs import (
    EvalSetupError,
    benchmarks_for,
    blind_score,
    build_model,
    evaluate_schedule,
    finite_interval,
    held_out_pass,
    known_for,
    log_records,
    reference_pass,
    score_metrics,
    seen_overlap,
    write_records,
)
from hidrop_platform.storage import StorageError, claim, hold
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    Tracker,
    TrackingUnavailable,
    check_tracking_uri,
    close_if_running,
    default_spool_dir,
    prepare_for,
    safe_name,
    schedule_params,
)
from hidrop_platform.train.driver import training_samples
from hidrop_platform.train.faults import fail_trial_if_asked, wait_at_trial_barrier
from hidrop_platform.tune.pareto import plot_pareto
from hidrop_platform.tune.rungs import RungPoint, goes_on
from hidrop_platform.tune.summary import (
    TrialRecord,
    confirm_markdown,
    front_mark,
    full_fidelity,
    interval_text,
    summarize_sweep,
)

OBJECTIVES = {"pareto": ([N.RELATIVE_SCORE, N.VISION_TFLOPS], ["max", "min"]), "score": (N.RELATIVE_SCORE, "max")}
OPTUNA_STREAK = 20  # rejected Optuna proposals in a row before a random valid point is enqueued for it
REFERENCE_FILE, SWEEP_FILE, RUNS_DIR = "reference.json", "sweep.json", "trial_runs"


@dataclasses.dataclass
class TrialContext:
    """What every trial of a sweep shares (Tune ships it to each trial through `with_parameters`)."""

    base: dict  # the experiment's raw config; a trial applies its overrides to it
    reference: dict  # the sweep's unpruned and blind scores (`_reference`)
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
    # the name of the actor that hands out MLflow basic auth (`_share_credentials`); never the secret itself,
    # since Tune pickles this context into the sweep folder (tuner.pkl holds the progress callback)
    credentials_from: Optional[str] = None


class _CredentialHolder:
    """Hands MLflow basic auth to trials from the driver's memory. Never on disk: Tune pickles the trial
    context into the sweep folder, and Ray logs a runtime env's variables in plain text."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, values: dict[str, str]) -> None:  # a call, not a constructor argument: GCS keeps actor specs
        self.values = dict(values)

    def get(self) -> dict[str, str]:
        return dict(self.values)


def _share_credentials(credentials: dict[str, str]) -> tuple[Optional[str], Any]:
    """(name, handle) of a named actor holding `credentials` for this sweep's trials; (None, None) when
    there are none. The actor ends when the handle is dropped: keep it while trials run."""
    if not credentials:
        return None, None
    import ray

    name = f"hidrop-credentials-{os.urandom(8).hex()}"  # concurrent sweeps on one cluster each have their own
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)  # lives with us
    handle = ray.remote(num_cpus=0)(_CredentialHolder).options(name=name, scheduling_strategy=here).remote()
    ray.get(handle.put.remote(credentials))
    return name, handle


def _fetch_credentials(name: Optional[str]) -> dict[str, str]:
    """The credentials a trial sets in its own environment (none when the sweep has none)."""
    if not name:
        return {}
    import ray

    return ray.get(ray.get_actor(name).get.remote())


class TuneSetupError(UserError, RuntimeError):
    """A sweep that cannot start or finish; one line for the user."""


class SweepInterrupted(KeyboardInterrupt):
    """Tune stopped early (Ctrl+C, SIGTERM): its state is saved and `--resume` continues it."""


# ---- building trial configs --------------------------------------------------------------------


def seed_overrides(seed: Any) -> tuple[str, dict]:
    """(label, overrides) of a seed: a preset name, or a schedule mapping (the whole schedule section)."""
    if isinstance(seed, str):
        return f"seed:{seed}", {"schedule": {"preset": seed}}
    spec = ScheduleSpec.model_validate(seed)
    name = spec.name or spec.preset or "custom"
    return f"seed:{name}", {"schedule": spec.model_dump(mode="json", exclude_none=True)}


def trial_config(base: dict, overrides: dict) -> ExperimentConfig:
    """The validated config of one trial (ConfigError names the problem)."""
    return validate_config(with_overrides(base, overrides), "trial")


def _budget_problem(cfg: ExperimentConfig) -> Optional[str]:

    budget = cfg.tune.max_vision_tflops
    if cfg.tune.objective != "score" or budget is None:
        return None
    tflops = cost_report(cfg.main_schedule, cfg.model.shape)["vision_tflops"]
    return f"over the vision-TFLOPs budget of {budget:g}" if tflops > budget else None


def _reason(err: Exception) -> str:
    """A rejection reason with the sample's numbers masked, so that one cause is counted once."""

    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", str(err).removeprefix("trial: "))


# ---- the searcher: seeds first, then valid samples only ----------------------------------------


def _domain(dim) -> Any:
    from ray import tune

    if dim.choice is not None:  # Optuna's categorical values must be scalars: search the index
        return tune.choice(list(range(len(dim.choice))))
    if dim.int_range is not None:
        lo, hi = dim.int_range
        return tune.qrandint(lo, hi, dim.step) if dim.step else tune.randint(lo, hi + 1)
    lo, hi = dim.float_range
    return tune.loguniform(lo, hi) if dim.log else tune.uniform(lo, hi)


def _decode(space: dict, raw: dict) -> dict:
    out = {}
    for key, dim in space.items():
        value = raw[key]
        if dim.choice is not None:
            value = dim.choice[int(value)]
        elif dim.int_range is not None:
            value = int(value)
        else:
            value = float(value)
        out[key] = value
    return out


class ScheduleSearcher(Searcher):
    """Suggests seed schedules first, then samples of `tune.space` from grid / random / Optuna.

    Every suggestion is turned into a trial config and validated here; an impossible schedule (or one
    over the FLOPs budget in `score` mode) never reaches a trial: it is counted by reason and, for
    Optuna, told as a failed trial so the sampler moves on.
    """

    def __init__(self, base: dict, cfg: ExperimentConfig):
        metric, mode = OBJECTIVES[cfg.tune.objective]
        super().__init__(metric=None, mode=None)  # Tune's own metric stays unset: the objectives are ours
        self.base, self.algorithm = base, cfg.tune.algorithm
        self.space = cfg.tune.space
        self.max_rejections = cfg.tune.max_rejections
        self.pending_seeds = [seed_overrides(s) for s in cfg.tune.seeds]
        self.num_seeds = len(self.pending_seeds)
        self.rejections: Counter = Counter()
        self.suggested = 0
        self.inner_ids: dict[str, str] = {}
        self.grid: list[dict] = []
        self.num_searched = cfg.tune.num_samples if self.space else 0
        self.rng_state: Optional[dict] = None
        self.inner = None
        if self.algorithm == "grid" and self.space:
            self.grid = self._valid_grid()
            self.num_searched = len(self.grid)
        elif self.algorithm == "optuna" and self.space:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(4, cfg.tune.num_samples // 4))
            space = OptunaSearch.convert_search_space({k: _domain(d) for k, d in self.space.items()})
            self.inner = OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler)
        if self.algorithm in ("random", "optuna"):
            import numpy as np

            self.rng_state = np.random.default_rng(cfg.seed).bit_generator.state

    @property
    def seeds_done(self) -> int:
        return self.num_seeds - len(self.pending_seeds)

    @property
    def total_trials(self) -> int:
        return self.num_seeds + self.num_searched

    def _check(self, overrides: dict) -> Optional[str]:
        try:
            return _budget_problem(trial_config(self.base, overrides))
        except ConfigError as e:
            return _reason(e)

    def _valid_grid(self) -> list[dict]:

        keys = list(self.space)
        points = []
        for values in itertools.product(*(self.space[k].values() for k in keys)):
            point = dict(zip(keys, values))
            problem = self._check(point)
            if problem is None:
                points.append(point)
            else:
                self.rejections[problem] += 1
        if not points:
            top = self.rejections.most_common(1)[0][0] if self.rejections else "empty space"
            raise TuneSetupError(f"tune.space: no grid point is a valid schedule (e.g. {top})")
        return points

    def _draw(self, trial_id: str, attempt: int) -> tuple[Optional[dict], Optional[str]]:
        """One raw sample (decoded to config values) and the inner searcher's id for it."""
        if self.algorithm == "grid":
            return self.grid[self.suggested - self.seeds_done], None
        if self.algorithm == "random":
            return _decode(self.space, self._random_raw()), None
        if attempt >= OPTUNA_STREAK:
            # TPE ignores failed trials, so it can keep proposing the same impossible corner: hand it a
            # random point to evaluate instead (it is told the result like any of its own)
            self.inner._ot_study.enqueue_trial(self._random_raw())
        inner_id = f"{trial_id}~{attempt}"
        raw = self.inner.suggest(inner_id)
        if raw is None or raw == self.FINISHED:
            return None, None
        return _decode(self.space, raw), inner_id

    def _random_raw(self) -> dict:
        import numpy as np

        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        raw = {k: _domain(d).sample(random_state=rng) for k, d in self.space.items()}
        self.rng_state = rng.bit_generator.state
        return {k: (v[0] if isinstance(v, list) else v) for k, v in raw.items()}

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.pending_seeds:
            label, overrides = self.pending_seeds.pop(0)
            self.suggested += 1
            return {"label": label, "overrides": overrides, "seed": True}
        if self.suggested - self.seeds_done >= self.num_searched:
            return self.FINISHED
        for attempt in range(self.max_rejections):
            point, inner_id = self._draw(trial_id, attempt)
            if point is None:
                return None
            problem = None if self.algorithm == "grid" else self._check(point)
            if problem is None:
                if inner_id is not None:
                    self.inner_ids[trial_id] = inner_id
                number = self.suggested - self.seeds_done + 1
                self.suggested += 1
                return {"label": f"trial-{number:03d}", "overrides": point, "seed": False}
            self.rejections[problem] += 1
            if inner_id is not None:
                self.inner.on_trial_complete(inner_id, result=None, error=True)
        top = self.rejections.most_common(1)[0][0]
        raise TuneSetupError(
            f"tune.space: {self.max_rejections} invalid samples in a row (most often: {top}); narrow the ranges"
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            self.inner.on_trial_complete(self.inner_ids.pop(trial_id), result=result, error=error)

    # -- checkpointing: Tuner.restore must not repeat seeds or re-draw finished samples --------------

    def get_state(self) -> dict:
        state = {
            "pending_seeds": self.pending_seeds,
            "rejections": dict(self.rejections),
            "suggested": self.suggested,
            "inner_ids": self.inner_ids,
            "rng_state": self.rng_state,
        }
        if self.inner is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self.inner.save(os.path.join(tmp, "inner"))
                state["inner"] = base64.b64encode(Path(tmp, "inner").read_bytes()).decode()
        return state

    def set_state(self, state: dict) -> None:
        self.pending_seeds = [tuple(s) for s in state["pending_seeds"]]
        self.rejections = Counter(state["rejections"])
        self.suggested = state["suggested"]
        self.inner_ids, self.rng_state = state["inner_ids"], state["rng_state"]
        if self.inner is not None and state.get("inner"):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "inner").write_bytes(base64.b64decode(state["inner"]))
                self.inner.restore(os.path.join(tmp, "inner"))  # Ray's own OptunaSearch format, written by us

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


def valid_share(base: dict, cfg: ExperimentConfig, draws: int = 300) -> tuple[float, Counter]:
    """The share of uniformly random samples of the space that make valid trials, with the reasons of
    the rest: a space that is (almost) all impossible fails here, before any cluster time is spent."""
    random_cfg = cfg.tune.model_copy(update={"algorithm": "random", "seeds": [], "num_samples": draws})
    probe = ScheduleSearcher(base, cfg.model_copy(update={"tune": random_cfg}))
    if not probe.space:
        return 1.0, Counter()
    reasons: Counter = Counter()
    for _ in range(draws):
        problem = probe._check(_decode(probe.space, probe._random_raw()))
        if problem is not None:
            reasons[problem] += 1
    return 1.0 - sum(reasons.values()) / draws, reasons


# ---- one trial (runs in a Ray actor) -----------------------------------------------------------

_MODEL_CACHE: dict[str, Any] = {}  # training-free trials in a reused actor share the loaded model


def _trial_model(cfg: ExperimentConfig, fresh: bool):
    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.seed])
    if fresh:
        return build_model(cfg)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(cfg)
    return _MODEL_CACHE[key]


def stored_known(reference: dict, schedule) -> Known:
    """The sweep's stored all-tokens and blind records as `evaluate(known=...)` takes them; a vanilla trial
    measures all tokens itself (it is that row)."""
    known = {
        method: {b: {r["id"]: QuestionRecord.model_validate(r) for r in rows} for b, rows in benches.items()}
        for method, benches in reference.get("records", {}).items()
    }
    return known_for(known, schedule)


def _evaluate(
    cfg: ExperimentConfig, vlm, reference: dict, benches: list, tracker, own: Optional[Known] = None, select=None
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


def point_key(config: dict) -> str:
    """A trial's key in `trial_runs/`: its label and sampled overrides, not Tune's trial id. After a
    crash Tune restores an older snapshot and hands the same points out again under new trial ids;
    keyed by the point, a finished one is reported from its record, never evaluated or logged twice."""
    point = {"label": config.get("label"), "overrides": config.get("overrides")}
    point = json.dumps(point, sort_keys=True, default=str)
    digest = hashlib.sha256(point.encode()).hexdigest()[:16]
    return f"{safe_name(str(config.get('label', 'trial')))}-{digest}"


def _trial_record(ctx: TrialContext, config: dict) -> dict:
    """What earlier attempts at this point left: its MLflow run id, attempts, and its result once done."""
    path = Path(ctx.sweep_dir) / RUNS_DIR / f"{point_key(config)}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_trial_record(ctx: TrialContext, config: dict, record: dict) -> None:
    folder = Path(ctx.sweep_dir) / RUNS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    key = point_key(config)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / f"{key}.json")


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune's function trainable: build the trial config, (train,) evaluate, report, log to MLflow."""
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(ctx.threads)))
    os.environ.update(_fetch_credentials(ctx.credentials_from))  # MLflow reads basic auth from there
    cfg = trial_config(ctx.base, config["overrides"])
    trial_id = tune.get_context().get_trial_id()
    record = _trial_record(ctx, config)
    if "result" in record:
        # finished before an interruption or a crash that Tune's saved state did not see: report it
        # again, do not run it again
        tune.report(record["result"])
        return
    run_id, attempts = record.get("run_id"), int(record.get("attempts", 0)) + 1
    tracker = Tracker(
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
            N.TRIAL_ID: trial_id,
            N.SEED: str(config["seed"]),
            N.DEVICE_TYPE: ctx.device_type,
            N.RAY_NODE: ray.get_runtime_context().get_node_id(),
        },
    ).start()
    run_id = tracker.run_id or run_id
    _save_trial_record(ctx, config, {"run_id": run_id, "attempts": attempts})
    schedule = cfg.main_schedule
    start = time.perf_counter()
    reported: dict = {}  # the last evaluation a trained trial reported to Tune
    try:
        tracker.set_tags({N.ATTEMPTS: attempts, N.STATUS: N.RUNNING})
        params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tune.")}
        params.update({f"{N.SEARCH}{k}": v for k, v in config["overrides"].items()})
        params.update({**schedule_params(schedule), N.DROP_LAYERS: [d.after_layer for d in schedule.drops]})
        tracker.log_params(params)
        wait_at_trial_barrier(config["label"])
        fail_trial_if_asked(config["label"], attempts)
        devices = float(ctx.devices_per_trial)
        if cfg.tune.kind == "trained":
            metrics = _trained(cfg, ctx, tracker, start, devices, reported)
        elif cfg.tune.fidelity is not None:
            metrics = _in_rungs(cfg, ctx, tracker, start, devices, reported)
        else:
            metrics, _ = _evaluate(cfg, _trial_model(cfg, fresh=False), ctx.reference, benchmarks_for(cfg), tracker)
            metrics[N.ACCELERATOR_HOURS] = (time.perf_counter() - start) * devices / 3600
            metrics[N.WALL_S] = time.perf_counter() - start
            tracker.log_metrics(metrics, step=0)
        # the result is kept before Tune hears of it: a trial Tune's saved state still calls running
        # after an interruption is then reported again on resume, not evaluated again
        _save_trial_record(ctx, config, {"run_id": tracker.run_id or run_id, "attempts": attempts, "result": metrics})
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
        tune.report(metrics)  # outside the try: Tune stopping the sweep here does not undo a finished run


def _in_rungs(cfg: ExperimentConfig, ctx: TrialContext, tracker, start: float, devices: float, reported: dict) -> dict:
    """A training-free trial in rungs of growing, nested question sets, reported to Tune after each (its
    `ParetoHalving` scheduler stops the ones that fall behind); each rung scores only its new questions."""
    from ray import tune

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
        wall = time.perf_counter() - start
        metrics.update(
            {N.RUNG: rung, N.QUESTIONS_RUN: questions, N.WALL_S: wall, N.ACCELERATOR_HOURS: wall * devices / 3600}
        )
        blind = blind_score(report)
        if blind is not None:  # the scheduler's floor: blind on this rung's questions
            metrics[N.BLIND_RELATIVE] = blind
        tracker.log_metrics(metrics, step=rung)
        reported.update(metrics)
        tune.report(metrics)  # the scheduler may stop the trial here
    return metrics


class ParetoHalving(FIFOScheduler):
    """Multi-fidelity promotion for rung-evaluated trials (hidrop_platform.tune.rungs): at each rung below
    the last, a trial goes on only if `promotion` keeps it among the trials that reached that rung so far
    ("halving": it ranks in the best 1/factor by what it adds to the front; "interval": it is not behind
    the front beyond its interval, and at the last promotion also ranks in the best 1/factor). Seeds
    always go on when `promote_seeds` is on."""

    # class defaults: a sweep started before these fields existed unpickles its scheduler without them
    promotion: str = "halving"
    ceiling: Optional[float] = None

    def __init__(
        self,
        rungs: int,
        factor: int,
        promote_seeds: bool,
        by_score: bool = False,
        promotion: str = "halving",
        ceiling: Optional[float] = None,  # the unpruned model's vision TFLOPs: the hypervolume's reference
    ):
        super().__init__()
        self.rungs, self.factor, self.promote_seeds, self.promotion = rungs, factor, promote_seeds, promotion
        self.ceiling = None if by_score else ceiling
        self.by_score = by_score  # objective "score": rank by relative score alone
        self.seen: dict[int, dict[str, RungPoint]] = {}  # rung -> trial id -> its point
        self.stopped: list[str] = []

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung = int(result.get(N.RUNG, 0))
        score, cost = result.get(N.RELATIVE_SCORE), result.get(N.VISION_TFLOPS)
        if rung < 1 or cost is None:
            return self.CONTINUE
        # an undefined score (a reference at 0 on a small rung) ranks last rather than stopping the sweep
        score = float(score) if score is not None and math.isfinite(float(score)) else -math.inf
        point = RungPoint(
            score=score,
            cost=0.0 if self.by_score else float(cost),
            low=result.get(N.RELATIVE_SCORE_LOW),
            high=result.get(N.RELATIVE_SCORE_HIGH),
            blind=result.get(N.BLIND_RELATIVE),
        )
        at_rung = self.seen.setdefault(rung, {})
        rivals = [p for t, p in at_rung.items() if t != trial.trial_id]
        at_rung[trial.trial_id] = point
        if rung >= self.rungs or (trial.config.get("seed") and self.promote_seeds):
            return self.CONTINUE
        if goes_on(point, rivals, self.factor, self.promotion, rung == self.rungs - 1, self.ceiling):
            return self.CONTINUE
        self.stopped.append(trial.trial_id)
        return self.STOP


def _trained(cfg: ExperimentConfig, ctx: TrialContext, tracker, start: float, devices: float, reported: dict) -> dict:
    """A short finetune with the schedule active, evaluated every `eval_every` steps (ASHA stops the
    weak ones early). Single process: nesting Ray Train groups inside trials leaks placement groups
    when ASHA stops them (ray-project/ray#54305)."""

    t = cfg.train
    vlm = _trial_model(cfg, fresh=True)
    data = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
    hook = _EvalEvery(cfg, vlm, ctx.reference, tracker, start, devices, reported)
    plain_training(vlm, cfg.main_schedule, data, t, steps=cfg.tune.train_steps, seed=cfg.seed, hooks=[hook])
    return hook.metrics


class _EvalEvery(Hook):
    """A trained trial's loss every step, and every `eval_every` steps its scores, reported to Tune."""

    def __init__(self, cfg: ExperimentConfig, vlm, reference: dict, tracker, start: float, devices: float, reported):
        self.cfg, self.vlm, self.reference, self.tracker = cfg, vlm, reference, tracker
        self.start, self.devices, self.reported = start, devices, reported
        self.benches = benchmarks_for(cfg)  # built once: the trial evaluates every eval_every steps
        self.metrics: dict = {}

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        from ray import tune

        self.tracker.log_metrics({N.LOSS: step.loss}, step=step.step)
        if step.step % self.cfg.tune.eval_every and step.step != step.total:
            return
        metrics, _ = _evaluate(self.cfg, self.vlm, self.reference, self.benches, self.tracker)
        wall = time.perf_counter() - self.start
        metrics.update(
            {
                N.TRAIN_STEP: step.step,
                N.LOSS: step.loss,
                N.WALL_S: wall,
                N.ACCELERATOR_HOURS: wall * self.devices / 3600,
            }
        )
        self.tracker.log_metrics(metrics, step=step.step)
        self.reported.update(metrics)
        self.metrics = metrics
        tune.report(metrics)  # ASHA may stop the trial here


# ---- the driver --------------------------------------------------------------------------------


def _reference(cfg: ExperimentConfig, sweep_dir: Path, progress: Optional[Callable[[str], None]]) -> dict:
    """All-tokens and blind scores of the base model on the sweep's benchmarks, computed once per sweep."""
    path = sweep_dir / REFERENCE_FILE
    key = json.loads(
        json.dumps(
            {"model": cfg.model.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed}
        )
    )
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and "records" in cached:  # a sweep that did not start, run again as is
            return cached

    if progress:
        progress("evaluating the unpruned reference")

    try:
        vlm = build_model(cfg)
        report = reference_pass(cfg, vlm, benchmarks_for(cfg))
    except (EvalSetupError, EvalError, ValueError, KeyError) as e:
        raise TuneSetupError(f"reference evaluation: {str(e).splitlines()[0]}") from None
    reference, blind = report.reference_row(), report.method("blind")
    ref = {
        "scores": reference.scores(),
        "blind_scores": blind.scores(),
        "blind_relative_score": blind.relative_score,
        "blind_relative_interval": blind.relative_interval,
        "signal": {b: c.model_dump() for b, c in (report.signal or {}).items()},
        # every question's record of both: trials reuse them, paired, instead of re-running them
        "records": {
            m.method: {b: [r.model_dump() for r in e.records or []] for b, e in m.benchmarks.items()}
            for m in (reference, blind)
        },
        "vision_tflops": reference.vision_tflops,
        "notes": report.notes,
        "samples": report.samples_evaluated,
        "key": key,
    }
    path.write_text(json.dumps(ref))
    write_records(report, sweep_dir / N.RECORDS_FILE)  # logged on the parent run as eval/records.jsonl.gz
    del vlm
    return ref


def _blind_bounds(reference: dict) -> dict[str, float]:
    """Blind's relative score and interval for the parent run (the report reads them back)."""
    out = {}
    if reference.get("blind_relative_score") is not None:
        out[N.BLIND_RELATIVE] = reference["blind_relative_score"]
    interval = reference.get("blind_relative_interval")
    if interval and all(v is not None and math.isfinite(v) for v in interval):
        out[N.BLIND_RELATIVE_LOW], out[N.BLIND_RELATIVE_HIGH] = interval
    return out


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
    before its progress bar, `run_tune` again (then it costs one node listing). A `--resume` with nothing
    to resume is said first: it needs no cluster."""
    name = cfg.tune.name or cfg.name
    _check_resume(Path(cfg.tune.storage_path).resolve() / name, name, resume)
    try:
        check_job_paths({"tune.storage_path": cfg.tune.storage_path}, cfg.tracking.uri, cfg.tracking.enabled)
        check_tracking_uri(cfg.tracking.uri, cfg.tracking.enabled)
        start_ray(cfg.tune.ray_address, "tune.ray_address")
        return _check_resources(cfg, alive_nodes())
    except (ClusterSetupError, TrackingUnavailable) as e:
        raise TuneSetupError(str(e)) from None


def run_tune(
    cfg: ExperimentConfig, base: dict, resume: bool = False, progress: Optional[Callable[[str, int, int], None]] = None
) -> dict:
    """Run (or resume) the sweep; returns every trial, the Pareto front and where the seeds sit. One
    driver at a time per sweep: a second is refused while the first runs."""
    name = cfg.tune.name or cfg.name
    sweep_dir = Path(cfg.tune.storage_path).resolve() / name
    share = _check_space(base, cfg)
    at_once, devices = connect_for_tune(cfg, resume)  # before the parent run: a failure here leaves nothing behind
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
) -> dict:
    """`run_tune` once this process holds the sweep's folder."""
    name = sweep_dir.name
    note = (lambda msg: progress(msg, 0, 0)) if progress else None
    parent, cfg, base = _open_parent(cfg, base, name, sweep_dir, resume)
    s = cfg.tune
    try:
        reference = _reference(cfg, sweep_dir, note)
        if s.confirm is not None:
            check_confirm(cfg, reference)  # before any trial: a confirmation that cannot run fails now
        parent.log_metrics(
            N.per_benchmark(N.REFERENCE, reference["scores"])
            | N.per_benchmark(N.BLIND, reference["blind_scores"])
            | _blind_bounds(reference),
            step=0,
        )
        if (sweep_dir / N.RECORDS_FILE).is_file():
            parent.log_artifact(sweep_dir / N.RECORDS_FILE, N.RECORDS_DIR)
        credentials_from, _holder = _share_credentials(tracking_credentials())  # the actor lives while _holder does
        ctx = TrialContext(
            base=base,
            reference=reference,
            sweep_dir=str(sweep_dir),
            sweep=name,
            tracking_uri=parent.tracking_uri,
            experiment=parent.experiment,
            parent_run_id=parent.run_id,
            tracking=cfg.tracking.enabled,
            spool_dir=str(parent.spool_path.parent),
            threads=s.resources_per_trial.get("CPU", 1),
            devices_per_trial=devices,
            device_type="gpu" if s.resources_per_trial.get("GPU", 0) > 0 else "cpu",
            credentials_from=credentials_from,
        )
        searcher = ScheduleSearcher(base, cfg)
        tuner = _tuner(cfg, ctx, searcher, _ProgressCallback(progress, searcher.total_trials, ctx), at_once, resume)
        start = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - start
        live = _searcher_of(tuner) or searcher
        if len(grid) < live.total_trials or grid.num_terminated + grid.num_errors < len(grid):
            raise SweepInterrupted(f"{grid.num_terminated + grid.num_errors} of {live.total_trials} trials finished")
        rungs = s.fidelity.rungs if s.fidelity else None
        summary = _summarize(grid, reference, live, name, at_once, wall, ctx, rungs)
        summary["valid_share"] = share
        if s.confirm is not None:
            try:
                summary["confirm"] = confirm_front(cfg, base, summary, reference, parent, note)
            except TuneSetupError as e:  # the sweep's own results stand: say what failed, keep them
                summary["confirm"] = {"rows": [], "notes": [str(e)]}
                summary["notes"] = [*summary.get("notes", []), str(e)]
        if s.objective == "score":
            fits = [
                r
                for r in summary["trials"]
                if r.get("relative_score") is not None
                and r["vision_tflops"] <= s.max_vision_tflops
                and full_fidelity(TrialRecord.model_validate(r), rungs)
            ]
            summary["best_under_budget"] = max(fits, key=lambda r: r["relative_score"])["label"] if fits else None
        _log_summary(parent, summary, sweep_dir, name, reference)
        parent.set_tags({N.STATUS: N.FINISHED})
        parent.finish("FINISHED")
        summary.update(parent_run_id=parent.run_id, tracking_uri=parent.tracking_uri, sweep_dir=str(sweep_dir))
        return summary
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not cut the bookkeeping short
        parent.set_tags({N.STATUS: N.INTERRUPTED if interrupted else N.FAILED})
        parent.finish("KILLED" if interrupted else "FAILED")
        raise


# ---- held-out confirmation ---------------------------------------------------------------------


def confirm_benchmarks(cfg: ExperimentConfig) -> list:
    """The confirmation's benchmarks: `tune.confirm.benchmarks`, or each search benchmark with
    `limit_factor` x its limit (the seen questions are removed when it runs)."""
    c = cfg.tune.confirm
    specs = c.benchmarks
    if specs is None:
        specs = []
        for b in cfg.eval.benchmarks:
            limit = b.limit or get_benchmark(b.name, seed=cfg.seed, **b.options).limit  # its own default
            if limit is None:
                raise TuneSetupError(
                    f"tune.confirm: the search evaluates all of {b.name}, so no question is left unseen; "
                    "give it a limit in eval.benchmarks or name held-out ones in tune.confirm.benchmarks"
                )
            specs.append(b.model_copy(update={"limit": limit * c.limit_factor}))
    return benchmarks_for(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"benchmarks": specs})}))


def _seen(reference: dict) -> dict[str, list[str]]:
    """Question ids the search evaluates, per benchmark (every rung's are among them)."""
    return {b: [r["id"] for r in rows] for b, rows in reference.get("records", {}).get(REFERENCE, {}).items()}


def check_confirm(cfg: ExperimentConfig, reference: dict) -> None:
    """Every confirmation benchmark has questions the search will not see (raises TuneSetupError)."""
    select = unseen_select(_seen(reference))
    for bench in confirm_benchmarks(cfg):
        try:
            left = select(bench, bench.samples())
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise TuneSetupError(f"tune.confirm: benchmark {bench.name!r}: {str(e).splitlines()[0]}") from None
        if not left:
            raise TuneSetupError(
                f"tune.confirm: benchmark {bench.name!r} has no question the search does not see; "
                "raise tune.confirm.limit_factor or name held-out benchmarks in tune.confirm.benchmarks"
            )


def confirm_front(cfg: ExperimentConfig, base: dict, summary: dict, reference: dict, parent, note=None) -> dict:
    """Re-evaluate the seeds and the top_k searched front trials, with all tokens and blind, on questions
    the search never saw (checked by id); log confirm/... metrics into each trial's run. Returns the
    search-vs-confirmed table and the optimism gap (search minus confirmed) of the searched winners."""
    c = cfg.tune.confirm
    outcomes = [r for r in summary["trials"] if TrialRecord.model_validate(r).is_outcome()]
    winners = sorted(
        (r for r in outcomes if r.get("pareto") and not r["seed"] and not r.get("blind_level")),
        key=lambda r: -r["relative_score"],
    )[: c.top_k]
    picks = [r for r in outcomes if r["seed"]] + winners
    if not picks:
        return {"rows": [], "notes": ["nothing to confirm: no finished seed or front trial"]}
    if note:
        note(f"confirming {len(picks)} schedules on held-out questions")
    seen = _seen(reference)
    schedules = {r["label"]: trial_config(base, r["overrides"]).main_schedule for r in picks}
    try:
        named = [sch.model_copy(update={"name": label}) for label, sch in schedules.items()]
        report = held_out_pass(cfg, build_model(cfg), named, confirm_benchmarks(cfg), seen)
    except (EvalSetupError, EvalError) as e:
        raise TuneSetupError(f"tune.confirm: {str(e).splitlines()[0]}") from None
    ref = report.reference_row()
    overlap = seen_overlap(report, seen)
    if overlap:  # unseen_select makes this impossible; a confirmation must never read a searched question
        raise TuneSetupError(f"tune.confirm: {overlap} held-out questions were seen by the search")
    rows = []
    for r in picks:
        row = ref if schedules[r["label"]].is_vanilla() else report.method(r["label"])
        confirmed = {
            N.RELATIVE_SCORE: row.relative_score,
            **N.per_benchmark(N.SCORE, row.scores()),
            N.SAMPLES: report.samples_evaluated,
        }
        if finite_interval(row.relative_interval) and row is not ref:
            confirmed[N.RELATIVE_SCORE_LOW], confirmed[N.RELATIVE_SCORE_HIGH] = row.relative_interval
        if row.above_blind is not None and row is not ref:
            confirmed[N.BLIND_LEVEL] = float(not row.above_blind)
        if r.get("run_id") and cfg.tracking.enabled:
            run = Tracker(
                parent.tracking_uri, parent.experiment, run_id=r["run_id"], spool_dir=str(parent.spool_path.parent)
            ).start()
            run.log_metrics({f"{N.CONFIRM}{k}": v for k, v in confirmed.items() if v is not None}, step=0)
            run.finish("FINISHED")
        rows.append(
            {
                "label": r["label"],
                "seed": r["seed"],
                "vision_tflops": r["vision_tflops"],
                "search": [r["relative_score"], r.get(N.RELATIVE_SCORE_LOW), r.get(N.RELATIVE_SCORE_HIGH)],
                "confirmed": [
                    row.relative_score,
                    *(
                        row.relative_interval
                        if finite_interval(row.relative_interval) and row is not ref
                        else [None, None]
                    ),
                ],
                "gap": None if row.relative_score is None else r["relative_score"] - row.relative_score,
                "blind_level": confirmed.get(N.BLIND_LEVEL),
            }
        )
    gaps = [x["gap"] for x in rows if not x["seed"] and x["gap"] is not None]
    out = {
        "benchmarks": {b: len(e.records or []) for b, e in ref.benchmarks.items()},
        "overlap": overlap,
        "reference_scores": ref.scores(),
        "rows": rows,
        "optimism_gap": sum(gaps) / len(gaps) if gaps else None,
        "notes": report.notes,
    }
    if out["optimism_gap"] is not None:
        parent.log_metrics({N.OPTIMISM_GAP: out["optimism_gap"]}, step=0)
    log_records(parent, report, N.CONFIRM_DIR)  # the held-out questions of every confirmed schedule
    return out


def _check_resume(sweep_dir: Path, name: str, resume: bool) -> None:
    from ray import tune

    can_restore = tune.Tuner.can_restore(str(sweep_dir)) if sweep_dir.exists() else False
    if resume and not can_restore:
        raise TuneSetupError(f"nothing to resume at {sweep_dir} (no Tune state there)")
    if not resume and can_restore:
        raise TuneSetupError(
            f"sweep {name!r} already exists at {sweep_dir}: pass --resume to continue it, "
            "or set tune.name=... for a new one"
        )


def _check_space(base: dict, cfg: ExperimentConfig) -> float:
    """The share of random samples of the space that are valid schedules; refuses a space with none."""
    share, reasons = valid_share(base, cfg) if cfg.tune.algorithm != "grid" else (1.0, Counter())
    if share == 0.0:
        raise TuneSetupError(
            f"tune.space: none of 300 random samples is a valid schedule (most often: "
            f"{reasons.most_common(1)[0][0]}); widen or fix the ranges"
        )
    return share


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


def _tuner(cfg: ExperimentConfig, ctx: TrialContext, searcher, callback, at_once: int, resume: bool):
    """Tune's Tuner over `run_trial` (restored from the sweep folder on resume); ASHA for trained trials."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

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
            ceiling=ctx.reference.get("vision_tflops"),
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


class _ProgressCallback(Callback):
    """Counts finished trials for the CLI's bar, and ends the MLflow run of a trial stopped from outside
    (ASHA stops a trained trial's actor: its own code never gets to end the run). Tune pickles its run
    config: the bar is not carried."""

    def __init__(
        self, progress: Optional[Callable[[str, int, int], None]], total: int, ctx: Optional[TrialContext] = None
    ):
        self.progress, self.total, self.done, self.ctx = progress, total, 0, ctx

    def __getstate__(self) -> dict:
        return {"progress": None, "total": self.total, "done": 0, "ctx": self.ctx}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self._close_run(trial.config)
        if self.progress:
            self.progress(trial.config.get("label", trial.trial_id), self.done, self.total)

    def _close_run(self, config: dict) -> None:
        if not self.ctx or not self.ctx.tracking:
            return

        run_id = _trial_record(self.ctx, config).get("run_id")
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


def _summarize(
    grid, reference: dict, searcher: Optional[ScheduleSearcher], name: str, at_once: int, wall: float, ctx, rungs=None
) -> dict:
    records = []
    for result in grid:
        config = result.config or {}
        metrics = dict(result.metrics or {})
        status = N.FAILED if result.error else N.FINISHED
        if status == N.FINISHED and rungs and metrics.get(N.RUNG, rungs) < rungs:
            status = N.STOPPED_EARLY  # the multi-fidelity scheduler stopped it after a rung: an outcome
        run_id = _trial_record(ctx, config).get("run_id") if config else None
        records.append(
            TrialRecord.from_metrics(
                config.get("label", "?"),
                status,
                metrics,
                seed=bool(config.get("seed")),
                overrides=config.get("overrides", {}),
                **({"run_id": run_id} if run_id else {}),
                **({"error": str(result.error).strip().splitlines()[-1][:300]} if result.error else {}),
            )
        )
    summary = summarize_sweep(
        records,
        reference["scores"],
        reference["blind_scores"],
        reference.get("blind_relative_interval"),
        reference.get("blind_relative_score"),
        rungs,
    )
    return {
        "sweep": name,
        "trials": [t.to_dict() for t in summary.trials],
        "pareto": summary.pareto,
        "significant": summary.significant,
        "blind_level": summary.blind_level,
        "discoveries": summary.discoveries(),
        "reference_scores": reference["scores"],
        "blind_relative_score": summary.blind_relative_score,
        "blind_relative_interval": summary.blind_relative_interval,
        "rejections": dict(searcher.rejections) if searcher else {},
        "rejected": sum(searcher.rejections.values()) if searcher else 0,
        "failed": summary.failed,
        "questions_run": int(sum(t.questions_run or 0 for t in summary.trials)),
        "concurrency": at_once,
        "wall_time_s": wall,
        "accelerator_hours": summary.accelerator_hours,
        "undefined": summary.undefined,
        "notes": [*reference.get("notes", []), *_undefined_note(summary.undefined, reference["scores"])],
    }


def _undefined_note(labels: list[str], reference_scores: dict) -> list[str]:
    """Why finished trials have no relative score: a reported state, not a crash."""
    if not labels:
        return []
    zero = [b for b, v in reference_scores.items() if v == 0] or list(reference_scores)
    return [
        f"{len(labels)} finished trials have no relative score: the all-tokens reference scores 0 on "
        f"{', '.join(zero)} (a ratio to 0 is undefined); their per-benchmark scores are in their runs"
    ]


def _rounded(overrides: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in overrides.items()}


def _log_summary(parent, summary: dict, sweep_dir: Path, name: str, reference: dict) -> None:
    out = sweep_dir / "summary"
    out.mkdir(exist_ok=True)
    ok = [r for r in summary["trials"] if TrialRecord.model_validate(r).is_outcome()]
    lines = [
        "| trial | front | relative score [95% CI] | vision TFLOPs | avg tokens | schedule overrides |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(ok, key=lambda r: r["vision_tflops"]):
        lines.append(
            f"| {r['label']} | {front_mark(r)} | {interval_text(r)} | "
            f"{r['vision_tflops']:.4g} | {r['avg_vision_tokens']:.1f} | `{json.dumps(_rounded(r['overrides']))}` |"
        )
    blind = reference.get("blind_relative_interval")
    lines += [
        "",
        "front: clear = no cheaper-or-equal trial's interval reaches its lower bound; yes = on the front of the "
        "estimates only; blind level = not significantly above answering without the image "
        f"(blind: {format_interval(reference['blind_relative_score'], blind)}).",
    ]
    lines += confirm_markdown(summary.get("confirm") or {})
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    if ok:
        plot_pareto(
            ok,
            out / "pareto.png",
            f"{name}: relative score vs vision TFLOPs",
            reference_lines={"blind": reference["blind_relative_score"]},
            reference_bands={"blind": blind} if blind else None,
        )
    for path in out.iterdir():
        parent.log_artifact(path, N.PARETO_DIR)
    parent.log_metrics(
        {
            N.TRIALS: len(summary["trials"]),
            N.FAILED_TRIALS: summary["failed"],
            N.REJECTED_SAMPLES: summary["rejected"],
            N.PARETO_SIZE: len(summary["pareto"]),
            N.ACCELERATOR_HOURS: summary["accelerator_hours"],
            N.WALL_S: summary["wall_time_s"],
        },
        step=0,
    )
