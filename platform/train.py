"""`hidrop train`: a Ray TorchTrainer whose workers train with DeepSpeed, tracked in MLflow.

The driver validates the config, prepares the MLflow store once (concurrent workers must not race on a
new sqlite schema), and fits the trainer. DeepSpeed is imported inside the worker only: the driver may
have no GPU. Rank 0 logs; the MLflow run id travels inside every checkpoint so a restarted worker group
(FailureConfig) or a re-run with the same name and storage path continues the SAME run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hidrop_platform import mlflow_names as N
from hidrop_platform.config import ExperimentConfig

STATE_FILE = "hidrop_state.json"
STOPPED_FILE = "stopped.txt"
STEP_TIMES_FILE = "step_times.json"
PROGRESS_FILE = "progress.json"
DS_TAG = "deepspeed"


class TrainSetupError(RuntimeError):
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
    from hidrop.data import easy_vqa_samples, load_llava_json
    from hidrop.evaluation.offline import Probes

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
def train_worker(payload: dict) -> None:
    import deepspeed
    import ray.train
    from torch.utils.data import DataLoader, DistributedSampler

    from hidrop.cost import cost_report
    from hidrop.training import TrainStep, lr_at, make_collator, make_dataset, merged_lora_export, set_trainable
    from hidrop_platform.evaluate import build_model
    from hidrop_platform.tracking import Tracker, package_versions, schedule_params, system_metrics

    cfg = ExperimentConfig.model_validate(payload["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if t.use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # before deepspeed.initialize, from Ray's assignment
    else:
        device = torch.device("cpu")
    if device.type == "cpu":  # one intra-op thread per CPU Ray gave this worker
        torch.set_num_threads(max(1, int(t.resources_per_worker.get("CPU", 1))))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)

    vlm = build_model(cfg, device=str(device))
    set_trainable(vlm, t.stage, t.lora)
    schedule = cfg.main_schedule
    step_module = TrainStep(vlm, schedule, budget_weight=t.budget_weight)
    if t.gradient_checkpointing:
        step_module.engine.gradient_checkpointing_enable()
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, config=deepspeed_config(cfg))
    frozen = any(not p.requires_grad for p in step_module.parameters())  # stage 1 and LoRA: most of the model

    dataset = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
    sampler = _ResumableSampler(
        DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    )
    loader = DataLoader(dataset, batch_size=t.micro_batch_size, sampler=sampler, collate_fn=make_collator(vlm))
    if len(loader) == 0:  # every rank sees the same lengths, so all stop here together
        if rank == 0:
            _stop(
                payload,
                f"{len(dataset)} training samples cannot fill one batch of {t.micro_batch_size} "
                f"on each of {world} workers",
            )
        return
    batches_per_epoch = len(loader)  # before any mid-epoch skip shortens the loader
    per_epoch = max(1, batches_per_epoch // t.grad_accum)
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))

    # resume: DeepSpeed state (model, optimizer, scheduler position) + our counters + the MLflow run
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run_id": None, "accel_seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    fail_at = int(payload.get("fail_at_step") or 0)  # tests: kill the first attempt at this step
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # frozen weights are not in the checkpoint: they come from model.path, as on the first attempt
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=not frozen)
            state.update(json.loads((Path(d) / STATE_FILE).read_text()))
    tracker = Tracker(
        payload["tracking_uri"],
        payload["experiment"],
        run_id=state["run_id"],
        run_name=cfg.name,
        enabled=rank == 0 and cfg.tracking.enabled,
        spool_dir=payload["spool_dir"],
        tags={N.KIND: N.KIND_TRAIN, N.DEVICE_TYPE: device.type, N.NUM_WORKERS: str(world), N.STAGE: t.stage},
    )
    tracker.start()
    if state["run_id"] is None and rank == 0:
        tracker.log_config(cfg)
        tracker.log_params({f"{N.SCHEDULE_PLAN}{i + 1}": n for i, n in enumerate(schedule.tokens_per_layer())})
        tracker.log_params(schedule_params(schedule))
        tracker.log_params({f"{N.VERSION}{k}": v for k, v in package_versions().items()})
        tracker.log_dict(deepspeed_config(cfg), N.DEEPSPEED_JSON)
    state["run_id"] = tracker.run_id

    from hidrop_platform.evaluate import model_shape_for_cost

    cost = cost_report(schedule, model_shape_for_cost(cfg, vlm))
    step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
    last_time, window_samples, window_tokens = time.perf_counter(), 0, 0
    window_start = last_time
    accel_seconds = state["accel_seconds"]
    step_times: list[float] = []  # optimizer-step wall times and losses of this attempt (for the overhead
    step_losses: list[float] = []  # benchmark)
    turns = None
    if payload.get("turns"):  # the overhead benchmark: take turns with the plain loop, one step each
        from hidrop_platform.turns import Turns

        turns = Turns(payload["turns"], "ray", "plain")
        turns.wait()  # the plain loop has set up
        last_time = time.perf_counter()
    step_loss = 0.0
    while step < total:
        sampler.set_epoch(epoch)
        sampler.skip = skip * t.micro_batch_size  # batches this epoch consumed before a restart: never loaded
        for i, batch in enumerate(loader, start=skip):
            out = engine(batch)
            loss_all = _mean_across(out["loss"], world)  # every rank sees the same value: they stop together
            if not math.isfinite(loss_all):
                message = f"loss is {loss_all} at step {step + 1}; lower the learning rate or check the data"
                tracker.set_tags({N.DIVERGED: message})
                tracker.finish("FAILED")
                if rank == 0:
                    _stop(payload, message)
                return
            engine.backward(out["loss"])
            step_loss += loss_all / t.grad_accum  # as the plain loop reports it
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, t.lr, t.lr_schedule, t.warmup_ratio)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            window_samples += batch["input_ids"].shape[0] * world
            window_tokens += int(out["tokens"]) * world
            state["batches_in_epoch"] = i + 1
            if not boundary:
                continue
            step += 1
            now = time.perf_counter()
            elapsed, last_time = now - last_time, now
            step_times.append(elapsed)
            step_losses.append(step_loss)
            step_loss = 0.0
            accel_seconds += elapsed * world
            window = now - window_start
            if step % t.log_every == 0 or step == total:
                loss = _mean_across(out["lm_loss"], world)
                metrics = {
                    N.LOSS: loss,
                    N.LR: optimizer.param_groups[0]["lr"],
                    N.SAMPLES_PER_S: window_samples / window,
                    N.TOKENS_PER_S: window_tokens / window,
                    N.EPOCH: epoch + (i + 1) / batches_per_epoch,
                    N.ACCELERATOR_HOURS: accel_seconds / 3600,
                    N.VISION_TFLOPS_PER_SAMPLE: cost["vision_tflops"],
                    N.MODEL_TFLOPS_PER_SAMPLE: cost["model_tflops"],
                    N.AVG_VISION_TOKENS: cost["avg_vision_tokens"],
                }
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics[N.GRAD_NORM] = float(grad_norm)
                if out["vision_tokens"] is not None:
                    metrics[N.VISION_TOKENS_KEPT] = float(out["vision_tokens"])
                if out["budget_loss"] is not None:
                    metrics[N.BUDGET_LOSS] = float(out["budget_loss"])
                    for i, keep in enumerate(step_module.engine.learned_schedule().keep_counts):
                        metrics[f"{N.LEARNED_KEEP}{i + 1}"] = float(keep)
                if rank == 0:
                    if tracker.enabled:
                        tracker.log_metrics({**metrics, **system_metrics()}, step=step)
                    _write_progress(payload["run_dir"], {"step": step, "total": total, **metrics})
                window_samples = window_tokens = 0
                window_start = now
            state.update(step=step, epoch=epoch, accel_seconds=accel_seconds)
            if step % t.checkpoint_every == 0 or step == total:
                state["run_id"] = tracker.run_id or state["run_id"]  # a run created after an outage
                _report_checkpoint(engine, state, {"loss": float(out["lm_loss"]), "step": step}, rank, frozen)
            if (t.export_every and step % t.export_every == 0) or step == total:
                folder = Path(payload["export_dir"]) / ("final" if step == total else f"step-{step}")
                weights = "projector" if vlm.kind == "mini_llava" and t.stage == "pretrain" else "all"
                vlm.projector_trained = True
                # ZeRO-3 partitions parameters: every rank gathers them, rank 0 writes
                gather = (
                    deepspeed.zero.GatheredParameters(list(step_module.parameters()), modifier_rank=None)
                    if t.zero_stage == 3
                    else contextlib.nullcontext()
                )
                with gather:
                    if rank == 0:
                        learned = step_module.engine.learned_schedule()  # learnable keep ratios: what they became
                        merged_lora_export(vlm, lambda: vlm.save(folder, schedule=learned, weights=weights))
                        if t.log_model:
                            tracker.log_artifact(folder, N.MODEL_DIR if step == total else N.model_step_dir(step))
            if step == total and t.eval_after and rank == 0:  # the others wait at the barrier below
                scores = _score_trained(cfg, vlm, step_module.engine.learned_schedule())
                if tracker.enabled:
                    tracker.log_metrics(scores, step=step)
            if step == fail_at and not resumed:
                raise RuntimeError(f"injected failure at step {step} (HIDROP_TEST_FAIL_AT_STEP)")
            if turns is not None:  # after the last step too: the plain loop's last step must not share the
                turns.hand_over()  # machine with this worker's shutdown
                turns.wait()
                last_time = time.perf_counter()  # the wait is not the step's time
            if step >= total:
                break
        else:
            epoch, skip = epoch + 1, 0
            state.update(epoch=epoch, batches_in_epoch=0)
            continue
        skip = 0
    tracker.finish()
    if turns is not None:
        turns.close()
    if rank == 0:
        Path(payload["run_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(payload["run_dir"]) / STEP_TIMES_FILE).write_text(
            json.dumps({"seconds": step_times, "loss": step_losses})
        )
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # avoids "terminate called without an active exception" at exit (stack.md)


def _score_trained(cfg: ExperimentConfig, vlm, schedule) -> dict[str, float]:
    """The trained model on eval.benchmarks: its schedule's scores, relative to the same model unpruned."""
    from hidrop_platform.evaluate import benchmarks_for, evaluate_schedule, score_metrics

    return score_metrics(evaluate_schedule(cfg, vlm, schedule, benchmarks_for(cfg)), schedule)


class _ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler that can start mid-epoch, so a resumed run does not reload skipped images."""

    def __init__(self, base):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def _write_progress(run_dir: str, info: dict) -> None:
    """Rank 0's latest step, for the driver's progress bar (worker stdout reaches the driver as log lines,
    where a bar cannot redraw)."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(folder / PROGRESS_FILE)


def read_progress(run_dir: str | Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _stop(payload: dict, message: str) -> None:
    """Tell the driver why the run stopped; it fails with this one line (no worker traceback)."""
    Path(payload["run_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(payload["run_dir"]) / STOPPED_FILE).write_text(message)


def _mean_across(value: torch.Tensor, world: int) -> float:
    import torch.distributed as dist

    v = value.detach().float().reshape(1).clone()
    if world > 1 and dist.is_initialized():
        dist.all_reduce(v)
        v /= world
    return float(v)


def _report_checkpoint(engine, state: dict, metrics: dict, rank: int, frozen: bool) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        # every rank writes its shards; frozen weights are left out (LoRA on a 7B: megabytes, not 13 GB)
        engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=frozen)
        if rank == 0:  # Ray merges every rank's folder: only rank 0 knows the MLflow run id
            (Path(d) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---- the driver ---------------------------------------------------------------------------------
def run_training(
    cfg: ExperimentConfig, progress: Optional[Callable[[dict], None]] = None, turns: Optional[str] = None
) -> dict:
    """Run the Ray Train job; `progress(info)` is called about once a second with rank 0's latest step.
    `turns`: the overhead benchmark's folder of turn pipes (the worker alternates steps with a plain loop)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hidrop_platform.tracking import DEFAULT_TRACKING_DIR, TrackingUnavailable, default_tracking_uri, prepare

    t = cfg.train
    uri = cfg.tracking.uri or default_tracking_uri()
    experiment = cfg.tracking.experiment or cfg.name
    if cfg.tracking.enabled:
        try:
            prepare(uri, experiment)
        except TrackingUnavailable as e:
            print(f"warning: {e}; training continues and metrics are buffered locally", flush=True)
    storage = Path(t.storage_path).resolve()
    start_ray(t.ray_address)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": uri,
            "experiment": experiment,
            "export_dir": str(storage / cfg.name / "export"),
            "run_dir": str(storage / cfg.name),
            "spool_dir": str(Path(DEFAULT_TRACKING_DIR).resolve() / "spool"),
            "fail_at_step": os.environ.get("HIDROP_TEST_FAIL_AT_STEP"),
            "turns": turns,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=t.resources_per_worker
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )
    stopped = storage / cfg.name / STOPPED_FILE
    stopped.unlink(missing_ok=True)
    (storage / cfg.name / PROGRESS_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            info = read_progress(storage / cfg.name)
            if info is not None:
                progress(info)

    watcher = threading.Thread(target=poll, daemon=True) if progress else None
    if watcher:
        watcher.start()
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        raise TrainSetupError(_root_message(e)) from None
    finally:
        done.set()
    if stopped.is_file():
        raise TrainSetupError(stopped.read_text().strip())
    metrics = dict(result.metrics or {})
    return {
        "experiment": cfg.name,
        "wall_time_s": time.perf_counter() - start,
        "metrics": metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(storage / cfg.name / "export" / "final"),
        "tracking_uri": uri,
    }


def start_ray(address: Optional[str] = None) -> None:
    """Connect to `address`, or start a local Ray, once per process. Worker output stays in Ray's log files
    (/tmp/ray/session_latest/logs): the driver shows progress bars, and --json prints only JSON."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's boxed banner ignores verbose=0
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": _worker_env()},
    )
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _worker_env() -> dict:
    env = {"HF_HUB_OFFLINE": "1"}
    for key in ("HIDROP_CACHE", "TORCH_EXTENSIONS_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _root_message(e: BaseException) -> str:
    text = str(e)
    for marker in ("TrainSetupError: ", "EvalSetupError: ", "ModelLoadError: ", "OverheadBenchError: ", "ValueError: "):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__
