"""The overhead of Ray Train + DeepSpeed over a plain training loop (`hidrop bench overhead`). The
method benchmarks (prefill, generation, training step) live in `hidrop_platform.bench.methods`, which
imports no ray, mlflow or deepspeed."""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from hidrop.training import make_dataset, plain_training
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import build_model
from hidrop_platform.train.driver import run_training
from hidrop_platform.train.turns import OverheadBenchError, RecordStepTimes, TakeTurns, Turns
from hidrop_platform.train.worker import deepspeed_config, training_samples

STEP_TIMES_FILE = "step_times.json"  # the Ray side's step times, under <storage>/<name>


# ---- training step: Ray Train + DeepSpeed vs a plain loop ------------------------------------------
def run_overhead_bench(cfg: ExperimentConfig, steps: int = 40, warmup: int = 5, storage: Optional[str] = None) -> dict:
    """Optimizer-step time of `hidrop train` (one local Ray worker running DeepSpeed) against a plain
    single-process loop over the same model, data order, batch size, thread count and checkpointing.

    The two run at the same time in separate processes and take turns, one optimizer step each (the plain
    loop sets up, hands the first turn to the worker, and from then on each waits while the other steps),
    so step i of one path is timed right next to step i of the other; the ratio is the median of those
    per-step ratios. A step's time runs from the end of the wait for its turn to the end of the optimizer
    step, data loading included, on both sides. The local Ray cluster's daemons stay up throughout.
    """

    t = cfg.train
    if t.use_gpu or t.precision != "fp32":
        raise OverheadBenchError(
            "bench overhead times fp32 CPU workers against a plain fp32 CPU loop; "
            "set train.use_gpu=false train.precision=fp32"
        )
    threads = max(1, int(t.resources_per_worker.get("CPU", 1)))
    total = warmup + steps
    storage = storage or tempfile.mkdtemp(prefix="hidrop-bench-")
    Path(storage).mkdir(parents=True, exist_ok=True)
    pipes = Turns.create(storage, ("ray", "plain"))
    plain_file = Path(storage) / "plain.json"
    plain_file.unlink(missing_ok=True)
    ray_cfg = _ray_side_config(cfg, storage, total)
    plain = multiprocessing.get_context("spawn").Process(
        target=_plain_side, args=(cfg.model_dump(mode="json"), total, threads, storage, str(plain_file)), daemon=True
    )
    plain.start()

    def watch_plain() -> None:  # a plain process killed outright (OOM, signal) must not leave the worker waiting
        plain.join()
        if plain.exitcode != 0:
            os.write(pipes["ray"], Turns.STOP)

    threading.Thread(target=watch_plain, daemon=True).start()
    ray_error: Optional[BaseException] = None
    try:
        ray_hooks = [
            TakeTurns(storage, "ray", "plain", hand_first=False, wait_after_last=True),
            RecordStepTimes(Path(storage) / cfg.name / STEP_TIMES_FILE),
        ]
        run_training(ray_cfg, hooks=ray_hooks)
    except BaseException as e:
        ray_error = e
        os.write(pipes["plain"], Turns.STOP)  # the plain loop may be waiting for a turn
    finally:
        plain.join(timeout=60)
        if plain.is_alive():
            plain.terminate()
            plain.join()
        for fd in pipes.values():
            os.close(fd)
    plain_run = _read_json(plain_file)
    if plain_run.get("error") and not isinstance(ray_error, KeyboardInterrupt):  # the cause, ahead of Ray's echo
        raise OverheadBenchError(f"the plain loop failed: {plain_run['error']}") from None
    if ray_error is not None:
        raise ray_error
    if not plain_run:
        raise OverheadBenchError(f"the plain loop failed: exit code {plain.exitcode}")
    ray_run = json.loads((Path(storage) / cfg.name / STEP_TIMES_FILE).read_text())
    return _overhead_result(cfg, ray_cfg, ray_run, plain_run, warmup, threads)


def _ray_side_config(cfg: ExperimentConfig, storage: str, total: int) -> ExperimentConfig:
    """One local worker that logs once (at the end) and never checkpoints mid-run: the plain loop does
    neither; tracking off."""
    ray_cfg = cfg.model_copy(deep=True)
    ray_cfg.train = cfg.train.model_copy(
        update={
            "num_workers": 1,
            "max_steps": total,
            "checkpoint_every": 10**9,
            "log_every": total,
            "export_every": None,
            "eval_after": False,
            "ray_address": None,
            "storage_path": storage,
            "max_failures": 0,
        }
    )
    ray_cfg.tracking = cfg.tracking.model_copy(update={"enabled": False})
    return ray_cfg


def _overhead_result(cfg, ray_cfg, ray_run: dict, plain_run: dict, warmup: int, threads: int) -> dict:
    """Medians, the per-step ratios' median and middle half, and both first-step losses."""

    t = cfg.train
    ray_times, plain_times = ray_run["seconds"][warmup:], plain_run["seconds"][warmup:]
    ratios = [r / p for r, p in zip(ray_times, plain_times)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    plain_s, ray_s = statistics.median(plain_times), statistics.median(ray_times)
    return {
        "experiment": cfg.name,
        "steps_timed": len(ratios),
        "warmup": warmup,
        "threads": threads,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "gradient_checkpointing": t.gradient_checkpointing,
        "zero_optimization": deepspeed_config(ray_cfg)["zero_optimization"],
        "plain_step_s": plain_s,
        "ray_deepspeed_step_s": ray_s,
        "overhead_ms": (ray_s - plain_s) * 1000,
        "overhead_ratio": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "first_loss": {"plain": plain_run["loss"][0], "ray_deepspeed": ray_run["loss"][0]},
        "goal": "<= 1.10x",
    }


def _read_json(path: Path) -> dict:
    """The plain side's result file: {} when it never wrote one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _plain_side(config: dict, total: int, threads: int, folder: str, out_path: str) -> None:
    """The plain loop's process: the same loop and data as the worker on the plain runtime, no Ray, no
    DeepSpeed; one step per turn. A failure is written to `out_path` as one line (no traceback)."""

    cfg = ExperimentConfig.model_validate(config)
    t = cfg.train
    turns = TakeTurns(folder, "plain", "ray", hand_first=True, wait_after_last=False)
    turns.open()  # before set-up: a failure there must still wake the worker
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        vlm = build_model(cfg, device="cpu")
        data = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
        hooks = [turns, RecordStepTimes(out_path)]
        plain_training(vlm, cfg.main_schedule, data, t, steps=total, seed=cfg.seed, hooks=hooks)
    except Exception as e:
        turns.stop()
        Path(out_path).write_text(
            json.dumps({"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})
        )
        sys.exit(1)
    finally:
        turns.close()
