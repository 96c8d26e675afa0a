"""The Ray Train worker of `hidrop train`: DeepSpeed over the training loop, rank 0 logging to MLflow.

The driver (`hidrop_platform.train.driver`) hands every worker a `WorkerPayload`; rank 0 sends back
`WorkerNews` (progress, why it stopped). A worker continues from the newest complete checkpoint in the
run folder, with the MLflow run id that checkpoint carries; a worker group Ray restarted before any
checkpoint finds its fit's run in the run file instead. DeepSpeed and Ray Train are imported inside the
worker's functions only: the driver may have no GPU, and the tune and bench drivers import this module
for `training_samples` and `deepspeed_config`. The loop's hooks are `hidrop_platform.train.hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from hidrop.cost import cost_report
from hidrop.data import easy_vqa_samples, load_llava_json
from hidrop.evaluation.offline import Probes
from hidrop.training import (
    LoopState,
    Runtime,
    TrainingDiverged,
    TrainingLoop,
    make_dataset,
    make_loader,
    parameter_groups,
    prepare_module,
    set_lr,
)
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import build_model, model_shape_for_cost
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.params import package_versions, schedule_params
from hidrop_platform.tracking.store import clear_interrupted, last_logged_step
from hidrop_platform.tracking.tracker import Tracker
from hidrop_platform.train.hooks import EvalAfter, ExportModel, LogMetrics, SaveCheckpoint
from hidrop_platform.train.resume import DS_TAG, STATE_FILE, load_deepspeed_checkpoint, newest_complete_checkpoint

RUN_FILE = "hidrop_run.json"  # in the run folder: this fit's MLflow run, for a group restarted before any checkpoint


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
    """The samples of `train.data`, source after source (`grid`: the model's patch grid, for the probes)."""
    samples = []
    for spec in cfg.train.data:
        if spec.name == "easy_vqa":
            samples += easy_vqa_samples("train", limit=spec.limit, seed=cfg.seed, **spec.options)
        elif spec.name == "probes":
            samples += Probes(
                limit=spec.limit or 100, seed=cfg.seed, split="train", grid=grid or 14, **spec.options
            ).samples()
        else:
            samples += load_llava_json(spec.path, spec.image_folder, limit=spec.limit)
    return samples


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
        set_lr(self.optimizer, lr)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def mean(self, value: torch.Tensor) -> float:
        return _mean_across(value, self.world)

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


def skip_inference_kernels() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce when it sets up communication on CPU:
    only its tensor-parallel inference (`inference_all_reduce`) uses that kernel, and building it costs
    about a minute of C++ compilation on a two-core machine the first time a worker starts."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def train_worker(config: dict) -> None:
    """One Ray Train worker: the model, DeepSpeed engine and data of its rank, run through the loop's hooks."""
    import deepspeed  # in the worker only (the module's docstring says why), as is every ray.train import
    import ray.train

    payload: WorkerPayload = config["payload"]
    os.environ.update(payload.credentials)  # MLflow reads basic auth from there
    cfg = ExperimentConfig.model_validate(payload.config)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _worker_device(t)
    skip_inference_kernels()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)

    vlm = build_model(cfg, device=str(device))
    schedule = cfg.main_schedule
    module = prepare_module(vlm, schedule, t)
    optimizer = torch.optim.AdamW(parameter_groups(module, t), lr=t.lr)
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

    def report(progress: dict) -> None:  # rank 0's step, for the driver's progress bar
        _tell(payload, WorkerNews(progress=progress))

    hooks = [
        LogMetrics(cfg, report, tracker, module, cost, rank, logged_until),
        SaveCheckpoint(engine, tracker, rank, frozen, t.checkpoint_every, _run_folder(payload)),
        ExportModel(cfg, Path(payload.export_dir), vlm, module, tracker, rank),
        *payload.hooks,
    ]
    if t.eval_after:
        hooks.insert(3, EvalAfter(cfg, vlm, module, tracker, rank))
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


def _mean_across(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    v = value.detach().float().reshape(1).clone()
    if world > 1 and dist.is_initialized():
        dist.all_reduce(v)
        v /= world
    return float(v)
