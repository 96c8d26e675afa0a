"""The training loop's hooks in a `hidrop train` worker: metrics to MLflow and progress to the driver,
DeepSpeed checkpoints, safetensors exports, and scoring the trained model into the same run.

Ray Train and DeepSpeed are imported inside the hooks only: they run in a worker, and the driver may have
no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from hidrop.training import Hook, StepEnd, TrainingLoop, merged_lora_export
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.evaluate.runs import benchmarks_for, evaluate_schedule, log_records, score_metrics
from hidrop_platform.tracking import names as N
from hidrop_platform.tracking.params import system_metrics
from hidrop_platform.train.resume import DS_TAG, STATE_FILE, mark_complete


class LogMetrics(Hook):
    """Every `log_every` steps: loss, LR, throughput, cost and the learned keep counts to MLflow, and rank 0's
    progress to the driver's bar through `report`. Collective (every rank computes the mean loss)."""

    def __init__(self, cfg, report: Callable[[dict], None], tracker, module, cost: dict, rank: int, logged_until=None):
        self.every, self.report, self.tracker, self.module, self.cost, self.rank = (
            cfg.train.log_every,
            report,
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
            for i, ratio in enumerate(self.module.engine.keep_fractions.detach().cpu().tolist()):
                metrics[f"{N.KEEP_RATIO}{i + 1}"] = ratio
        if self.rank == 0:
            redone = self.logged_until is not None and step.step <= self.logged_until
            if self.tracker.enabled and not redone:  # a redone step's first values stand: no duplicate points
                self.tracker.log_metrics({**metrics, **system_metrics()}, step=step.step)
            self.report({"step": step.step, "total": step.total, **metrics})
        self.samples = self.tokens = 0


class SaveCheckpoint(Hook):
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


class ExportModel(Hook):
    """Every `export_every` steps and at the end: the model as safetensors with its (learned) schedule."""

    def __init__(self, cfg, folder: Path, vlm, module, tracker, rank: int):
        self.t, self.folder, self.vlm, self.module, self.tracker, self.rank = (
            cfg.train,
            folder,  # the run's export folder
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


class EvalAfter(Hook):
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
