"""The model side of training: what trains in each LLaVA stage, datasets, and the loss of one batch.

Pure torch (no ray, deepspeed or mlflow): `TrainingLoop` is the one training loop; the platform's Ray
worker runs it on a DeepSpeed runtime, trained search trials and the overhead benchmark on `PlainRuntime`.

Stage 1 (pretrain): the projector only; encoder and LM frozen. Stage 2 (finetune): projector + LM
(full, or LoRA adapters through peft). The schedule is active in both: the engine runs the pruned
forward with multi-round queries when the schedule asks for them, and a learnable keep ratio adds its
budget loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from hidrop.adapter import Backbone
from hidrop.data import Collator, SupervisedDataset, get_template
from hidrop.engine import ScheduledModel
from hidrop.models import MiniLlava, VisionLanguageModel
from hidrop.sample import Sample
from hidrop.schedule import Schedule

STAGES = ("pretrain", "finetune")
PROGRESS = "training_progress"  # set in each batch by the loop: steps done / total (anneals the DTop-K budget)
RATIO_PARAMETER = "keep_fraction_log"  # the engine's learnable DTop-K keep ratios (log offsets)
FIXED_LR = "fixed_lr"  # an optimizer group's constant learning rate, outside the LR schedule


def set_trainable(vlm: VisionLanguageModel, stage: str, lora: Optional[dict] = None) -> list[str]:
    """Freeze/unfreeze per stage; returns the names of the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    model = vlm.model
    model.requires_grad_(False)
    projector = _projector(vlm)
    projector.requires_grad_(True)
    if stage == "finetune":
        lm = vlm.lm
        if lora:
            from peft import LoraConfig, inject_adapter_in_model

            cfg = LoraConfig(
                r=int(lora.get("r", 8)),
                lora_alpha=int(lora.get("alpha", 16)),
                lora_dropout=float(lora.get("dropout", 0.0)),
                target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
            )
            inject_adapter_in_model(cfg, _decoder(vlm))
            for name, p in _decoder(vlm).named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            _decoder(vlm).requires_grad_(True)
            lm.lm_head.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _projector(vlm: VisionLanguageModel) -> nn.Module:
    projector = vlm.model.projector if isinstance(vlm.model, MiniLlava) else Backbone(vlm.model).projector
    if projector is None:
        raise ValueError(f"a {vlm.kind} model has no projector to train")
    return projector


def _decoder(vlm: VisionLanguageModel) -> nn.Module:
    return Backbone(vlm.lm).decoder


class TrainStep(nn.Module):
    """The module DeepSpeed wraps: a batch in, the training loss out (LM loss + budget loss)."""

    def __init__(
        self, vlm: VisionLanguageModel, schedule: Schedule, budget_weight: float = 1.0, budget_anneal: float = 0.0
    ):
        super().__init__()
        self.vlm = vlm
        if isinstance(vlm.model, MiniLlava):
            # the frozen CNN stays outside what DeepSpeed wraps: its batch-norm buffers would not follow
            # a bf16 cast of the parameters, and it never trains
            self.lm, self.projector = vlm.model.lm, vlm.model.projector
        else:
            self.model = vlm.model  # registered so DeepSpeed sees (and partitions) every parameter
        self.engine = ScheduledModel(
            vlm.lm,
            schedule,
            image_token_id=vlm.image_token_id,
            budget_weight=budget_weight,
            budget_anneal=budget_anneal,
        )

    def forward(self, batch: dict) -> dict:
        device = next(self.parameters()).device
        self.engine.budget_progress = float(batch.get(PROGRESS, 1.0))  # how far the budget's target has annealed
        ids = batch["input_ids"].to(device)
        vision = None
        if "pixel_values" in batch:
            vision = self.vlm.vision_embeds(batch["pixel_values"].to(device)).flatten(0, 1)
        out = self.engine(
            ids,
            batch["attention_mask"].to(device),
            vision_embeds=vision,
            vision_mask=ids == self.vlm.image_token_id,
            labels=batch["labels"].to(device),
            return_logits=False,
        )
        total = out.loss  # the engine already adds the budget term for learnable keep ratios
        lm_loss = total.detach() if out.budget_loss is None else (total - out.budget_loss).detach()
        counts = out.layer_vision_counts
        return {
            "loss": total,
            "lm_loss": lm_loss,
            "budget_loss": None if out.budget_loss is None else out.budget_loss.detach(),
            "vision_tokens": None if counts is None else counts.float().mean().detach(),
            "tokens": batch["attention_mask"].sum().to(device),
        }


def merged_lora_export(vlm: VisionLanguageModel, save: Callable[[], object]) -> object:
    """Run `save` with LoRA adapters merged into plain Linear layers (a checkpoint any loader reads),
    then restore the adapters so training can go on."""
    swapped = []
    for name, module in list(vlm.model.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            parent = vlm.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vlm.model
            setattr(parent, name.rsplit(".", 1)[-1], module.base_layer)
            swapped.append((parent, name.rsplit(".", 1)[-1], module))
    try:
        return save()
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
            module.unmerge()


def make_dataset(
    vlm: VisionLanguageModel,
    samples: Sequence[Sample],
    template: Optional[str] = None,
    max_length: Optional[int] = None,
) -> SupervisedDataset:
    return SupervisedDataset(
        samples,
        vlm.tokenizer,
        get_template(template or vlm.template),
        image_token_id=vlm.image_token_id,
        num_image_tokens=vlm.num_vision_tokens,
        image_processor=vlm.image_processor,
        max_length=max_length,
    )


def make_collator(vlm: VisionLanguageModel) -> Collator:
    return Collator.for_tokenizer(vlm.tokenizer, padding_side="right")


def lr_at(step: int, total: int, base: float, schedule: str = "cosine", warmup_ratio: float = 0.03) -> float:
    """LLaVA's schedule: linear warm-up then cosine decay to 0 (or constant / linear decay)."""
    warmup = int(math.ceil(total * warmup_ratio))
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Recipe(Protocol):
    """The training settings the loop reads (the platform's `TrainConfig` is one)."""

    stage: str
    lora: Optional[dict]
    micro_batch_size: int
    grad_accum: int
    lr: float
    lr_schedule: str
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    budget_weight: float
    budget_anneal: float
    ratio_lr: float
    gradient_checkpointing: bool


def prepare_module(vlm: VisionLanguageModel, schedule: Schedule, recipe: Recipe) -> TrainStep:
    """Freeze per stage (LoRA adapters injected) and wrap the model in the module that returns the loss."""
    set_trainable(vlm, recipe.stage, recipe.lora)
    module = TrainStep(vlm, schedule, budget_weight=recipe.budget_weight, budget_anneal=recipe.budget_anneal)
    if recipe.gradient_checkpointing:
        module.engine.gradient_checkpointing_enable()
    return module


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_groups(module: nn.Module, recipe: Recipe) -> list[dict]:
    """The optimizer's groups: the trainable weights at `lr`, and the learnable DTop-K keep ratios in a
    group of their own at a constant `ratio_lr` without weight decay (the DTop-K reference trains its
    ratios far faster than the weights: at the weights' rate a ratio moves a token or two in a short run;
    and the budget's target reaches the budget only part-way through training, when a decaying schedule
    would leave the ratios too little rate to follow it)."""
    ratios = [p for n, p in module.named_parameters() if p.requires_grad and n.endswith(RATIO_PARAMETER)]
    taken = {id(p) for p in ratios}
    weights = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": weights, "weight_decay": recipe.weight_decay}] if weights else []
    if ratios:
        groups.append({"params": ratios, "weight_decay": 0.0, "lr": recipe.ratio_lr, FIXED_LR: recipe.ratio_lr})
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate for this step; a group with a fixed rate (the keep ratios) keeps it."""
    for group in optimizer.param_groups:
        group["lr"] = group.get(FIXED_LR, lr)


class ResumableSampler(Sampler):
    """A DistributedSampler that can start mid-epoch, so a resumed run does not reload skipped images."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def make_loader(
    vlm: VisionLanguageModel,
    dataset: SupervisedDataset,
    micro_batch_size: int,
    seed: int,
    world: int = 1,
    rank: int = 0,
) -> tuple[DataLoader, ResumableSampler]:
    """This rank's shuffled, drop-last share of the data (the same order on every runtime)."""
    sampler = ResumableSampler(
        DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    )
    loader = DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=make_collator(vlm))
    return loader, sampler


# ---- one training loop, two runtimes ----------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss went non-finite (one line for the user)."""


@dataclasses.dataclass
class LoopState:
    """Where a run stands; checkpointed and restored by the platform's worker."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    accel_seconds: float = 0.0  # step time x workers (GPU hours on an accelerator)


@dataclasses.dataclass
class StepEnd:
    """What hooks see after each optimizer step."""

    step: int
    total: int
    loss: float  # the step's training loss (mean over its micro-batches and workers)
    seconds: float  # wall time of the step, hooks' paused time excluded
    samples: int  # over all workers
    tokens: int
    epoch_progress: float  # epochs done, fractional
    output: dict  # the last micro-batch's TrainStep output (lm_loss, budget_loss, vision_tokens, tokens)


class Hook:
    """Plugs into `TrainingLoop`: logging, checkpoints, exports, evaluation, turn-taking, test faults."""

    def on_start(self, loop: "TrainingLoop") -> None:
        pass

    def on_step_end(self, loop: "TrainingLoop", step: StepEnd) -> None:
        pass

    def on_end(self, loop: "TrainingLoop") -> None:
        """After the last step (not after an error)."""


class Runtime:
    """How a micro-batch runs and an optimizer step is taken: `PlainRuntime` here, DeepSpeed in the platform."""

    world: int = 1

    def forward(self, batch: dict) -> dict:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> bool:
        """After every micro-batch; True when it completed an optimizer step (gradient accumulation)."""
        raise NotImplementedError

    def mean(self, value: torch.Tensor) -> float:
        """The mean over workers (every worker calls it: all see the same value)."""
        return float(value.detach().float())

    def grad_norm(self) -> Optional[float]:
        return None


class PlainRuntime(Runtime):
    """One process, torch AdamW, gradient accumulation and clipping by hand."""

    def __init__(self, module: TrainStep, recipe: Recipe):
        self.module = module
        self.params = trainable_parameters(module)
        self.optimizer = torch.optim.AdamW(parameter_groups(module, recipe), lr=recipe.lr)
        self.grad_accum, self.grad_clip = recipe.grad_accum, recipe.grad_clip
        self._micro, self._norm = 0, None

    def forward(self, batch: dict) -> dict:
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float) -> bool:
        self._micro += 1
        if self._micro % self.grad_accum:
            return False
        if self.grad_clip:
            self._norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def grad_norm(self) -> Optional[float]:
        return self._norm


class TrainingLoop:
    """The one training loop: epochs over a resumable sampler, LR schedule, divergence check, step timing,
    hooks after every optimizer step. The Ray/DeepSpeed worker, trained search trials and the overhead
    benchmark's plain side all run it; only the `Runtime` and the hooks differ."""

    def __init__(
        self,
        runtime: Runtime,
        loader: DataLoader,
        sampler: ResumableSampler,
        *,
        total: int,
        recipe: Recipe,
        hooks: Sequence[Hook] = (),
        state: Optional[LoopState] = None,
    ):
        sampler.skip = 0  # `run` sets the skip per epoch; the lengths below are whole epochs
        if len(loader) == 0:
            raise ValueError(f"{len(loader.dataset)} training samples make no batch of {recipe.micro_batch_size}")
        self.runtime, self.loader, self.sampler, self.total, self.recipe = runtime, loader, sampler, total, recipe
        self.hooks = list(hooks)
        self.state = state or LoopState()
        self.batches_per_epoch = len(loader)  # before any mid-epoch skip shortens the loader
        self._paused = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not the step's (a hook waiting for its turn)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def run(self) -> LoopState:
        st, r, world = self.state, self.recipe, self.runtime.world
        for hook in self.hooks:
            hook.on_start(self)
        last, self._paused = time.perf_counter(), 0.0
        step_loss, samples, tokens = 0.0, 0, 0
        skip = st.batches_in_epoch
        while st.step < self.total:
            self.sampler.set_epoch(st.epoch)
            self.sampler.skip = skip * r.micro_batch_size  # batches a restarted epoch consumed: never loaded
            for i, batch in enumerate(self.loader, start=skip):
                batch[PROGRESS] = st.step / self.total
                out = self.runtime.forward(batch)
                loss = self.runtime.mean(out["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {st.step + 1}; lower the learning rate or check the data"
                    )
                self.runtime.backward(out["loss"])
                step_loss += loss / r.grad_accum
                samples += batch["input_ids"].shape[0] * world
                tokens += int(out["tokens"]) * world
                st.batches_in_epoch = i + 1
                if not self.runtime.step(lr_at(st.step, self.total, r.lr, r.lr_schedule, r.warmup_ratio)):
                    continue
                st.step += 1
                now = time.perf_counter()
                seconds, last, self._paused = now - last - self._paused, now, 0.0
                st.accel_seconds += seconds * world
                end = StepEnd(
                    st.step,
                    self.total,
                    step_loss,
                    seconds,
                    samples,
                    tokens,
                    st.epoch + (i + 1) / self.batches_per_epoch,
                    out,
                )
                step_loss, samples, tokens = 0.0, 0, 0
                for hook in self.hooks:
                    hook.on_step_end(self, end)
                if st.step >= self.total:
                    break
            else:
                st.epoch, st.batches_in_epoch, skip = st.epoch + 1, 0, 0
                continue
            skip = 0
        for hook in self.hooks:
            hook.on_end(self)
        return st


def plain_training(
    vlm: VisionLanguageModel,
    schedule: Schedule,
    dataset: SupervisedDataset,
    recipe: Recipe,
    *,
    steps: int,
    seed: int = 0,
    hooks: Sequence[Hook] = (),
) -> LoopState:
    """The loop in one process (the same sampler order as one Ray worker): short trained search trials
    (where nesting Ray Train inside Tune trials costs more than it gives) and the overhead benchmark."""
    module = prepare_module(vlm, schedule, recipe)
    loader, sampler = make_loader(vlm, dataset, recipe.micro_batch_size, seed)
    module.train()
    try:
        return TrainingLoop(
            PlainRuntime(module, recipe), loader, sampler, total=steps, recipe=recipe, hooks=hooks
        ).run()
    finally:
        module.eval()
