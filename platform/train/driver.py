"""`hidrop train`: a Ray TorchTrainer whose workers train with DeepSpeed, tracked in MLflow.

The driver validates the config, prepares the MLflow store once (concurrent workers must not race on a
new sqlite schema), and fits the trainer. DeepSpeed is imported inside the worker only: the driver may
have no GPU. Rank 0 logs; the MLflow run id travels inside every checkpoint so a restarted worker group
(FailureConfig) or a re-run with the same name and storage path continues the SAME run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from hidrop.cost import cost_report
from hidrop.data import easy_vqa_samples, load_llava_json
from hidrop.errors import UserError
from hidrop.evaluation.offline import Probes
from hidrop.models import ModelLoadError
from hidrop.schedule import first_error_line
from hidrop.training import (
    Hook,
    LoopState,
    Runtime,
    StepEnd,
    TrainingDiverged,
    TrainingLoop,
    make_dataset,
    make_loader,
    merged_lora_export,
    prepare_module,
    trainable_parameters,
)
from hidrop_platform.cluster.connect import ClusterSetupError, alive_nodes, check_fits, check_job_paths, start_ray
from hidrop_platform.config.schema import ExperimentConfig, tracking_credentials
from hidrop_platform.evaluate.runs import (
    EvalSetupError,
    benchmarks_for,
    build_model,
    evaluate_schedule,
    log_records,
    model_shape_for_cost,
    score_metrics,
)
from hidrop_platform.storage import StorageError, hold
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.store import (
    Tracker,
    TrackingUnavailable,
    check_tracking_uri,
    clear_interrupted,
    close_if_running,
    default_spool_dir,
    last_logged_step,
    package_versions,
    prepare_for,
    schedule_params,
    system_metrics,
)
from hidrop_platform.train.faults import fault_hooks
from hidrop_platform.train.resume import (
    ContinuationRefused,
    UnsafeCheckpoint,
    check_run_folder,
    load_deepspeed_checkpoint,
    mark_complete,
    newest_complete_checkpoint,
    prepare_run_folder,
    ray_checkpoints,
)
from hidrop_platform.train.turns import OverheadBenchError

STATE_FILE = "hidrop_state.json"
RUN_FILE = "hidrop_run.json"  # in the run folder: this fit's MLflow run, for a group restarted before any checkpoint
DS_TAG = "deepspeed"


class TrainSetupError(UserError, RuntimeError):
    """The run cannot start or failed for a reason the user can fix (one line for the CLI)."""


def deepspeed_config(cfg: ExperimentConfig) -> dict:
    """The DeepSpeed config generated from `train:`, with `train.deepspeed` merged over it."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    if not t.use_gpu and t.zero_stage in (1, 2):
        # contiguous gradients copy every gradient into one buffer against CUDA allocator fragmentation;
        # on CPU that is only a copy per parameter (measured: ~6 ms of a 60 ms tiny-model step)
        zero["contiguous_gradients"] = False
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # we pass torch AdamW: no JIT-compiled optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, t.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def training_samples(cfg: ExperimentConfig, grid: int):

    samples = []
    for spec in cfg.train.data:
        if spec.name == "easy_vqa":
            samples += easy_vqa_samples("train", limit=spec.limit, seed=cfg.seed)
        elif spec.name == "probes":
            samples += Probes(
                limit=spec.limit or 100, seed=cfg.seed, split="train", grid=grid or 14, **spec.options
            ).samples()
        else:
            samples += load_llava_json(spec.path, spec.image_folder, limit=spec.limit)
    return samples


# ---- the worker ---------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkerPayload:
    """What the driver hands every Ray Train worker (pickled by Ray; one definition for both sides)."""

    config: dict  # the ExperimentConfig's JSON form
    tracking_uri: str
    experiment: str
    export_dir: str
    spool_dir: str
    news: Any = None  # a ray.util.queue.Queue of WorkerNews to the driver (None: nobody listens)
    hooks: list = dataclasses.field(default_factory=list)  # extra loop hooks: test faults, the benchmark's turns
    credentials: dict = dataclasses.field(default_factory=dict)  # MLflow basic auth, never in a runtime env
    fit_id: str = ""  # one per `run_training` call: a restarted worker group shares it, a re-run does not


@dataclasses.dataclass
class WorkerNews:
    """What rank 0 tells the driver while it runs: its latest step (for the progress bar: worker output
    reaches the driver only as log lines, where a bar cannot redraw), or why the run stopped (the driver
    fails with that one line; a stop returns normally, so Ray does not retry it)."""

    progress: Optional[dict] = None
    stopped: Optional[str] = None
    run_id: Optional[str] = None  # the MLflow run, sent once: the driver closes it on Ctrl+C
    controller: Any = None  # Ray Train's controller actor, sent once: the driver aborts it on Ctrl+C


def _tell(payload: "WorkerPayload", news: WorkerNews) -> None:
    from ray.util.queue import Full

    if payload.news is None:
        return
    try:
        payload.news.put_nowait(news)
    except Full:  # the driver is behind: a progress update may be dropped, the next one follows
        if news.stopped is not None:
            payload.news.put(news, timeout=30)


class DeepSpeedRuntime(Runtime):
    """The loop's runtime under DeepSpeed: its engine accumulates, clips and steps."""

    def __init__(self, engine, optimizer, world: int):
        self.engine, self.optimizer, self.world = engine, optimizer, world

    def forward(self, batch: dict) -> dict:
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, lr: float) -> bool:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def mean(self, value: torch.Tensor) -> float:
        return _mean_across(value, self.world)

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


def train_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    payload: WorkerPayload = config["payload"]
    os.environ.update(payload.credentials)  # MLflow reads basic auth from there
    cfg = ExperimentConfig.model_validate(payload.config)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _worker_device(t)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)

    vlm = build_model(cfg, device=str(device))
    schedule = cfg.main_schedule
    module = prepare_module(vlm, schedule, t)
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=t.lr, weight_decay=t.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg))
    frozen = any(not p.requires_grad for p in module.parameters())  # stage 1 and LoRA: most of the model

    dataset = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
    loader, sampler = make_loader(vlm, dataset, t.micro_batch_size, cfg.seed, world=world, rank=rank)
    if len(loader) == 0:  # every rank sees the same lengths, so all stop here together
        if rank == 0:
            message = (
                f"{len(dataset)} training samples cannot fill one batch of {t.micro_batch_size} "
                f"on each of {world} workers"
            )
            _tell(payload, WorkerNews(stopped=message))
        return
    total = t.max_steps or max(1, math.ceil(t.epochs * max(1, len(loader) // t.grad_accum)))
    state, run_id = _resume(engine, frozen, _run_folder(payload))
    if run_id is None:  # no checkpoint yet: a group Ray restarted still logs into this fit's run
        run_id = _run_of_this_fit(payload)
    tracker = _worker_tracker(cfg, payload, run_id, rank, world, device, schedule)
    logged_until = None
    if rank == 0 and tracker.enabled and tracker.run_id:
        _tell(payload, WorkerNews(run_id=tracker.run_id))
        _remember_run(payload, tracker.run_id)
        if run_id is not None:  # continued: the earlier attempt may have logged steps past its checkpoint
            logged_until = last_logged_step(payload.tracking_uri, run_id, N.LOSS)
            tracker.set_tags({N.RESUMED_FROM_STEP: state.step})
            clear_interrupted(payload.tracking_uri, run_id)
    cost = cost_report(schedule, model_shape_for_cost(cfg, vlm))
    hooks = [
        _LogMetrics(cfg, payload, tracker, module, cost, rank, logged_until),
        _Checkpoint(engine, tracker, rank, frozen, t.checkpoint_every, _run_folder(payload)),
        _Export(cfg, payload, vlm, module, tracker, rank),
        *payload.hooks,
    ]
    if t.eval_after:
        hooks.insert(3, _EvalAfter(cfg, vlm, module, tracker, rank))
    loop = TrainingLoop(
        DeepSpeedRuntime(engine, optimizer, world), loader, sampler, total=total, recipe=t, hooks=hooks, state=state
    )
    try:
        loop.run()
    except TrainingDiverged as e:
        tracker.set_tags({N.DIVERGED: str(e)})
        tracker.finish("FAILED")
        if rank == 0:
            _tell(payload, WorkerNews(stopped=str(e)))
        return
    tracker.finish()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # avoids "terminate called without an active exception" at exit (stack.md)


def _worker_device(t) -> torch.device:
    import ray.train

    if t.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # before deepspeed.initialize, from Ray's assignment
        return device
    torch.set_num_threads(max(1, int(t.resources_per_worker.get("CPU", 1))))  # one thread per CPU Ray gave
    return torch.device("cpu")


def _resume(engine, frozen: bool, folder: Path) -> tuple[LoopState, Optional[str]]:
    """The DeepSpeed state (model, optimizer) and our counters from the newest complete checkpoint in the
    run folder (Ray's latest can be older: it registers checkpoints asynchronously, and Ctrl+C or a dead
    worker loses the newest), else from Ray's latest (a run from before completion marks), with the MLflow
    run id it carries; a fresh state without either."""
    import ray.train
    import torch.distributed as dist

    newest = newest_complete_checkpoint(folder)
    chosen = [newest[0].name if newest else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)  # rank 0's choice: a node's stale listing must not differ
    if chosen[0] is not None:
        return _load_checkpoint(engine, frozen, folder / chosen[0])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState(), None
    with checkpoint.as_directory() as d:
        return _load_checkpoint(engine, frozen, Path(d))


def _load_checkpoint(engine, frozen: bool, d: Path) -> tuple[LoopState, Optional[str]]:
    # frozen weights are not in the checkpoint: they come from model.path, as on the first attempt;
    # tensors and DeepSpeed's known state only: the folder may be shared storage
    load_deepspeed_checkpoint(engine, str(d), tag=DS_TAG, strict=not frozen)
    saved = json.loads((d / STATE_FILE).read_text())
    run_id = saved.pop("run_id", None)
    return LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__}), run_id


def _run_folder(payload: WorkerPayload) -> Path:
    return Path(payload.export_dir).parent


def _run_file(payload: WorkerPayload) -> Path:
    return Path(payload.export_dir).parent / RUN_FILE


def _run_of_this_fit(payload: WorkerPayload) -> Optional[str]:
    """The MLflow run an earlier worker group of the same fit started (a worker killed before the first
    checkpoint), else None."""
    try:
        known = json.loads(_run_file(payload).read_text())
    except (OSError, ValueError):
        return None
    return known.get("run_id") if payload.fit_id and known.get("fit_id") == payload.fit_id else None


def _remember_run(payload: WorkerPayload, run_id: str) -> None:
    path = _run_file(payload)
    with contextlib.suppress(OSError):  # only a restart before the first checkpoint needs it
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"fit_id": payload.fit_id, "run_id": run_id}))
        temporary.replace(path)


def _worker_tracker(cfg: ExperimentConfig, payload: WorkerPayload, run_id, rank: int, world: int, device, schedule):
    """Rank 0's MLflow run (a resumed attempt continues `run_id`); the run's params on its first attempt."""

    tracker = Tracker(
        payload.tracking_uri,
        payload.experiment,
        run_id=run_id,
        run_name=cfg.name,
        enabled=rank == 0 and cfg.tracking.enabled,
        spool_dir=payload.spool_dir,
        tags={N.KIND: N.KIND_TRAIN, N.DEVICE_TYPE: device.type, N.NUM_WORKERS: str(world), N.STAGE: cfg.train.stage},
    )
    tracker.start()
    if run_id is None and rank == 0:
        tracker.log_config(cfg)
        tracker.log_params({f"{N.SCHEDULE_PLAN}{i + 1}": n for i, n in enumerate(schedule.tokens_per_layer())})
        tracker.log_params(schedule_params(schedule))
        tracker.log_params({f"{N.VERSION}{k}": v for k, v in package_versions().items()})
        tracker.log_dict(deepspeed_config(cfg), N.DEEPSPEED_JSON)
    return tracker


class _LogMetrics(Hook):
    """Every `log_every` steps: loss, LR, throughput, cost and the learned keep counts to MLflow, and rank 0's
    progress to the driver's bar. Collective (every rank computes the mean loss)."""

    def __init__(self, cfg, payload: WorkerPayload, tracker, module, cost: dict, rank: int, logged_until=None):
        self.every, self.payload, self.tracker, self.module, self.cost, self.rank = (
            cfg.train.log_every,
            payload,
            tracker,
            module,
            cost,
            rank,
        )
        self.samples = self.tokens = 0
        self.seconds = 0.0
        self.logged_until: Optional[int] = logged_until  # a continued run: steps up to here are in MLflow already

    def on_start(self, loop: TrainingLoop) -> None:
        self.window_start = time.perf_counter()

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        self.samples, self.tokens = self.samples + step.samples, self.tokens + step.tokens
        if step.step % self.every and step.step != step.total:
            return
        now = time.perf_counter()
        window, self.window_start = now - self.window_start, now
        out = step.output
        metrics = {
            N.LOSS: loop.runtime.mean(out["lm_loss"]),
            N.LR: loop.runtime.optimizer.param_groups[0]["lr"],
            N.SAMPLES_PER_S: self.samples / window,
            N.TOKENS_PER_S: self.tokens / window,
            N.EPOCH: step.epoch_progress,
            N.ACCELERATOR_HOURS: loop.state.accel_seconds / 3600,
            N.VISION_TFLOPS_PER_SAMPLE: self.cost["vision_tflops"],
            N.MODEL_TFLOPS_PER_SAMPLE: self.cost["model_tflops"],
            N.AVG_VISION_TOKENS: self.cost["avg_vision_tokens"],
        }
        grad_norm = loop.runtime.grad_norm()
        if grad_norm is not None:
            metrics[N.GRAD_NORM] = grad_norm
        if out["vision_tokens"] is not None:
            metrics[N.VISION_TOKENS_KEPT] = float(out["vision_tokens"])
        if out["budget_loss"] is not None:
            metrics[N.BUDGET_LOSS] = float(out["budget_loss"])
            for i, keep in enumerate(self.module.engine.learned_schedule().keep_counts):
                metrics[f"{N.LEARNED_KEEP}{i + 1}"] = float(keep)
        if self.rank == 0:
            redone = self.logged_until is not None and step.step <= self.logged_until
            if self.tracker.enabled and not redone:  # a redone step's first values stand: no duplicate points
                self.tracker.log_metrics({**metrics, **system_metrics()}, step=step.step)
            _tell(self.payload, WorkerNews(progress={"step": step.step, "total": step.total, **metrics}))
        self.samples = self.tokens = 0


class _Checkpoint(Hook):
    """Every `every` steps and at the end: DeepSpeed's state plus the loop's counters and the MLflow run id."""

    def __init__(self, engine, tracker, rank: int, frozen: bool, every: int, folder: Path):
        self.engine, self.tracker, self.rank, self.frozen, self.every = engine, tracker, rank, frozen, every
        self.folder = folder  # the run folder on storage, where Ray puts each checkpoint

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        if step.step % self.every and step.step != step.total:
            return
        import ray.train

        # the run id goes in every checkpoint: a run created after a tracking outage is continued too
        state = {**dataclasses.asdict(loop.state), "run_id": self.tracker.run_id}
        with tempfile.TemporaryDirectory() as d:
            # every rank writes its shards; frozen weights are left out (LoRA on a 7B: megabytes, not 13 GB)
            self.engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=self.frozen)
            if self.rank == 0:  # Ray merges every rank's folder: only rank 0 knows the MLflow run id
                (Path(d) / STATE_FILE).write_text(json.dumps(state))
            # the mean over workers (every rank is here: a collective), the figure MLflow logs too
            progress = {"loss": loop.runtime.mean(step.output["lm_loss"]), "step": step.step}
            before = ray.train.get_checkpoint()
            ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(d))
        self._mark_complete(before, step.step)

    def _mark_complete(self, before, step: int) -> None:
        """Each rank uploads its own part of a checkpoint; once all passed the barrier, every part is on
        storage and rank 0 marks it complete (what a resume looks for)."""
        import ray.train
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        persisted = ray.train.get_checkpoint()
        if self.rank == 0 and persisted is not None and (before is None or persisted.path != before.path):
            with contextlib.suppress(OSError):  # unmarked, it is passed over: a resume takes an older one
                mark_complete(self.folder / Path(persisted.path).name, step)  # else Ray skipped the report


def export_weights(vlm, t) -> str:
    """What an export of the mini-LLaVA holds beyond what ships in packages: the projector after stage 1,
    the projector and LoRA factors after a LoRA stage 2 on the LM as packaged; otherwise (other models,
    full finetunes, LoRA on an LM that an earlier finetune or adapter already changed) all."""
    if vlm.kind != "mini_llava":
        return "all"
    if t.stage == "pretrain" and vlm.lm_as_packaged:
        return "projector"
    return "adapter" if t.lora and vlm.lm_as_packaged else "all"


class _Export(Hook):
    """Every `export_every` steps and at the end: the model as safetensors with its (learned) schedule."""

    def __init__(self, cfg, payload: WorkerPayload, vlm, module, tracker, rank: int):
        self.t, self.folder, self.vlm, self.module, self.tracker, self.rank = (
            cfg.train,
            Path(payload.export_dir),
            vlm,
            module,
            tracker,
            rank,
        )

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        t, last = self.t, step.step == step.total
        if not (last or (t.export_every and step.step % t.export_every == 0)):
            return
        import deepspeed

        folder = self.folder / ("final" if last else f"step-{step.step}")
        weights = export_weights(self.vlm, t)
        self.vlm.projector_trained = True
        # ZeRO-3 partitions parameters: every rank gathers them, rank 0 writes
        gather = (
            deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
            if t.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if self.rank == 0:
                learned = self.module.engine.learned_schedule()  # learnable keep ratios: what they became
                if weights == "adapter":  # the factors themselves: a few MB instead of the whole LM
                    self.vlm.save(folder, schedule=learned, weights=weights)
                else:
                    merged_lora_export(self.vlm, lambda: self.vlm.save(folder, schedule=learned, weights=weights))
                if t.log_model:
                    self.tracker.log_artifact(folder, N.MODEL_DIR if last else N.model_step_dir(step.step))


class _EvalAfter(Hook):
    """After the last step, rank 0 scores the trained model into the same run (the others wait at the
    worker's final barrier)."""

    def __init__(self, cfg, vlm, module, tracker, rank: int):
        self.cfg, self.vlm, self.module, self.tracker, self.rank = cfg, vlm, module, tracker, rank

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        if step.step != step.total or self.rank != 0:
            return
        scores = _score_trained(self.cfg, self.vlm, self.module.engine.learned_schedule(), self.tracker)
        if self.tracker.enabled:
            self.tracker.log_metrics(scores, step=step.step)


def _score_trained(cfg: ExperimentConfig, vlm, schedule, tracker) -> dict[str, float]:
    """The trained model on eval.benchmarks: its schedule's scores, relative to the same model unpruned."""

    report = evaluate_schedule(cfg, vlm, schedule, benchmarks_for(cfg))
    log_records(tracker, report)  # rank 0 only: the others' trackers are disabled
    return score_metrics(report, schedule)


def _mean_across(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    v = value.detach().float().reshape(1).clone()
    if world > 1 and dist.is_initialized():
        dist.all_reduce(v)
        v /= world
    return float(v)


# ---- the driver ---------------------------------------------------------------------------------
def connect_for_training(cfg: ExperimentConfig, restart: bool = False, force: bool = False) -> None:
    """Check the run folder (`check_run_folder`), reach Ray and check that the workers can ever be
    placed, before anything is written: a refused continuation or a cluster that cannot be reached or
    used leaves nothing behind. The CLI calls it before its progress bar; `run_training` again (then it
    costs one node listing)."""
    t = cfg.train
    try:
        check_job_paths({"train.storage_path": t.storage_path}, cfg.tracking.uri, cfg.tracking.enabled)
        check_tracking_uri(cfg.tracking.uri, cfg.tracking.enabled)
        check_run_folder(Path(t.storage_path).resolve() / cfg.name, cfg.model_dump(mode="json"), restart, force)
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
) -> dict:
    """Run the Ray Train job; `progress(info)` is called about once a second with rank 0's latest step.
    A run of the same name in `train.storage_path` is continued only when its config agrees
    (`hidrop_platform.train.resume`); `restart` moves it aside, `force` continues it with the new config.
    `hooks` join every worker's loop (the overhead benchmark's turn-taking); the test faults of
    `hidrop_platform.train.faults` join them when their environment variable asks. One driver at a time
    per run: a second is refused while the first runs."""
    connect_for_training(cfg, restart, force)
    folder = Path(cfg.train.storage_path).resolve() / cfg.name
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    t = cfg.train
    uri, experiment = prepare_for(cfg, "training")
    storage = folder.parent
    try:
        continued = prepare_run_folder(folder, cfg.model_dump(mode="json"), restart=restart, force=force)
    except ContinuationRefused as e:
        raise TrainSetupError(str(e)) from None
    news = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
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
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[_controller_reporter(news)],
        ),
    )
    start = time.perf_counter()
    done, stopped, heard = threading.Event(), [], {}
    listener = threading.Thread(target=_listen, args=(news, progress, done, stopped, heard), daemon=True)
    listener.start()
    # Ray Train handles SIGINT itself when fit() runs in the main thread (it aborts and exits without a
    # word); in a thread of its own it does not, so Ctrl+C reaches us and we can say where the run stands
    outcome: dict = {}
    fitting = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True, name="hidrop-fit")
    fitting.start()
    try:
        while fitting.is_alive():
            fitting.join(timeout=0.5)
    except KeyboardInterrupt:
        import ray

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not cut this short
        try:
            # Ray's own graceful abort (the workers stop, fit returns) once workers run; a run still waiting
            # for its workers has nothing to save, and its controller answers only once they are placed, so
            # it is killed (fit returns at once; a fit thread still inside Ray at shutdown ends the process)
            controller = heard.get("controller")
            started = heard.get("run_id") is not None or heard.get("step") is not None
            if controller is not None:
                with contextlib.suppress(Exception):
                    if started:
                        ray.get(controller.abort.remote(), timeout=60)
                    else:
                        ray.kill(controller, no_restart=True)
                fitting.join(timeout=60)
            done.set()
            listener.join(timeout=10)
            message = _interrupted(cfg, folder, uri, heard)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise TrainInterrupted(message) from None
    finally:
        done.set()
        listener.join(timeout=10)
        with contextlib.suppress(Exception):  # after Ctrl+C Ray is already down
            news.shutdown(force=True)
    if "error" in outcome:  # WorkerGroupError carries each failed worker's exception
        raise TrainSetupError(_failure_message(outcome["error"]))
    result = outcome["result"]
    if stopped:
        raise TrainSetupError(stopped[0].strip())
    removed = _remove_orphans(folder, result)
    metrics = dict(result.metrics or {})
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
