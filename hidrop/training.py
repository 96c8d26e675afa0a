"""The model side of training: what trains in each LLaVA stage, datasets, and the loss of one batch.

Pure torch (no ray, deepspeed or mlflow): the platform's Ray/DeepSpeed worker drives these pieces, and a
plain single-process loop can drive them too (the overhead benchmark compares both).

Stage 1 (pretrain): the projector only; encoder and LM frozen. Stage 2 (finetune): projector + LM
(full, or LoRA adapters through peft). The schedule is active in both: the engine runs the pruned
forward with multi-round queries when the schedule asks for them, and a learnable keep ratio adds its
budget loss.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

from torch import nn

from hidrop.adapter import Backbone
from hidrop.data import Collator, SupervisedDataset, get_template
from hidrop.engine import ScheduledModel
from hidrop.models import MiniLlava, VisionLanguageModel
from hidrop.sample import Sample
from hidrop.schedule import Schedule

STAGES = ("pretrain", "finetune")


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

    def __init__(self, vlm: VisionLanguageModel, schedule: Schedule, budget_weight: float = 1.0):
        super().__init__()
        self.vlm = vlm
        if isinstance(vlm.model, MiniLlava):
            # the frozen CNN stays outside what DeepSpeed wraps: its batch-norm buffers would not follow
            # a bf16 cast of the parameters, and it never trains
            self.lm, self.projector = vlm.model.lm, vlm.model.projector
        else:
            self.model = vlm.model  # registered so DeepSpeed sees (and partitions) every parameter
        self.engine = ScheduledModel(vlm.lm, schedule, image_token_id=vlm.image_token_id, budget_weight=budget_weight)

    def forward(self, batch: dict) -> dict:
        device = next(self.parameters()).device
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


def plain_training(
    vlm: VisionLanguageModel,
    schedule: Schedule,
    dataset: SupervisedDataset,
    *,
    steps: int,
    stage: str = "finetune",
    lora: Optional[dict] = None,
    micro_batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    budget_weight: float = 1.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> Iterator[dict]:
    """A single-process loop over the same pieces as the Ray/DeepSpeed worker (same sampler order as one
    worker). Yields {"step", "loss", "seconds"} after every optimizer step; used by the overhead benchmark
    and by short trained search trials (where nesting Ray Train inside Tune trials costs more than it gives).
    """
    import time

    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    set_trainable(vlm, stage, lora)
    module = TrainStep(vlm, schedule, budget_weight=budget_weight)
    if gradient_checkpointing:
        module.engine.gradient_checkpointing_enable()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=make_collator(vlm))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training samples make no batch of {micro_batch_size}")
    batches, epoch = iter(loader), 0
    module.train()
    for step in range(steps):
        start = time.perf_counter()
        loss = 0.0
        for _ in range(grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            out = module(batch)["loss"] / grad_accum
            out.backward()
            loss += float(out.detach())
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, lr_schedule, warmup_ratio)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield {"step": step + 1, "loss": loss, "seconds": time.perf_counter() - start}
    module.eval()
