"""The `train:` section of an experiment: its data, LoRA and DeepSpeed settings, checked before Ray starts."""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from hidrop.schedule import ConfigModel


class DataSpec(ConfigModel):
    """One training source: easy_vqa (train split), probes (train seeds), or LLaVA JSON + image folder."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["easy_vqa", "probes", "llava_json"]
    limit: Optional[int] = Field(default=None, gt=0)  # probes: per family
    path: Optional[str] = None  # llava_json: the .json / .jsonl file
    image_folder: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _path_needed(self) -> "DataSpec":
        if self.name == "llava_json" and not self.path:
            raise ValueError("data name=llava_json needs path (a LLaVA JSON/JSONL file)")
        if self.name == "easy_vqa":
            unknown = sorted(set(self.options) - {"per_family", "balance_answers"})
            if unknown:
                raise ValueError(
                    f"data name=easy_vqa: unknown option {unknown[0]!r} (it takes per_family, balance_answers)"
                )
            if not isinstance(self.options.get("balance_answers", False), bool):
                raise ValueError("data name=easy_vqa: options.balance_answers must be true or false")
            per_family = self.options.get("per_family")
            if per_family is not None and (not isinstance(per_family, int) or per_family <= 0):
                raise ValueError("data name=easy_vqa: options.per_family must be a positive integer")
            if per_family is not None and self.limit is not None:
                raise ValueError("data name=easy_vqa: give limit or options.per_family, not both")
        return self


class LoraConfig(ConfigModel):
    """`train.lora`: peft's LoraConfig fields that the trainer passes on (anything else is a typo)."""

    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


# DeepSpeed's top-level config sections (its docs); `train.deepspeed` may hold others, but not a near miss
DEEPSPEED_KEYS = (
    "train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 "
    "amp gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients zero_optimization "
    "zero_allow_untested_optimizer zero_force_ds_cpu_optimizer steps_per_print wall_clock_breakdown dump_state "
    "flops_profiler activation_checkpointing sparse_attention data_efficiency curriculum_learning tensorboard "
    "wandb csv_monitor comet elasticity communication_data_type seq_parallel_communication_data_type autotuning "
    "checkpoint aio data_types compile torch_autocast pipeline memory_breakdown hybrid_engine "
    "dataloader_drop_last disable_allgather gradient_allreduce_op log_level use_data_before_expert_parallel_ "
    "compression_training weight_quantization nebula timers graph_harvesting"
).split()


def near_miss(key: str, known) -> Optional[str]:
    """The one name of `known` that `key` is a likely misspelling of, or None (also when it is known)."""
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return close[0] if close else None


class TrainConfig(ConfigModel):
    """LLaVA's two stages under Ray Train + DeepSpeed. Defaults follow LLaVA-1.5 where they apply."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "finetune"] = "pretrain"
    # a two-stage recipe: the experiment YAML of the stage before this one (e.g. the projector pretraining
    # with the same schedule active); `hidrop train` runs it first (continuing or skipping it when it has
    # already run) and starts this stage from its exported model, so model.path stays unset
    previous_stage: Optional[str] = None
    lora: Optional[dict[str, Any]] = None  # finetune only: LoraConfig's fields {r, alpha, dropout, target_modules}
    data: list[DataSpec] = Field(default_factory=lambda: [DataSpec(name="easy_vqa", limit=2000)])
    template: Optional[str] = None  # default: the model's (chatml for the mini-LLaVA); "plain" for LLaVA stage 1
    max_length: Optional[int] = Field(default=None, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: Optional[int] = Field(default=None, gt=0)  # optimizer steps; overrides epochs
    micro_batch_size: int = Field(default=4, gt=0)  # per worker
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)  # LLaVA-1.5: 1e-3 pretrain, 2e-5 finetune
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(default=0, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_checkpointing: bool = False
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged over the generated DeepSpeed config
    # dtopk_learnable: weight of the budget loss (its overshoot relative to the budget); at 5 it outweighs
    # the LM loss's push for more tokens on the mini-LLaVA, so the keeps end at the budget
    budget_weight: float = Field(default=5.0, ge=0)
    # dtopk_learnable: the fraction of training over which the budget's target anneals from keeping every
    # token to the budget, and the keep ratios' own learning rate (constant: outside the LR schedule; on
    # their log scale, 1e-2 moves each keep by about 1% of itself per step)
    budget_anneal: float = Field(default=0.5, ge=0, le=1)
    ratio_lr: float = Field(default=1e-2, gt=0)
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    storage_path: str = "runs"  # Ray RunConfig storage (shared storage on a cluster)
    checkpoint_every: int = Field(default=50, gt=0)  # optimizer steps between DeepSpeed checkpoints
    export_every: Optional[int] = Field(default=None, gt=0)  # steps between safetensors exports (always at the end)
    keep_checkpoints: int = Field(default=2, gt=0)
    max_failures: int = Field(default=0, ge=0)
    log_every: int = Field(default=1, gt=0)
    log_model: bool = True  # exported models also become MLflow artifacts (a copy per export)
    eval_after: bool = False  # rank 0 scores the trained model on eval.benchmarks (and unpruned) into the same run
    ray_address: Optional[str] = None  # None: a local Ray

    @field_validator("lora")
    @classmethod
    def _lora_fields(cls, value):
        return None if value is None else LoraConfig.model_validate(value).model_dump()

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_keys(cls, value: dict) -> dict:
        for key in value:
            meant = near_miss(key, DEEPSPEED_KEYS)
            if meant:
                raise ValueError(f"unknown DeepSpeed key {key!r}: did you mean {meant!r}?")
        checkpoint = value.get("checkpoint")
        if isinstance(checkpoint, dict) and checkpoint.get("load_universal"):
            # its loads (zero/optimizer_state.pt, hp shards) bypass the checkpoint engine that resume.py
            # makes weights-only: a pickle planted in the shared storage folder would run
            raise ValueError(
                "checkpoint.load_universal is not supported: DeepSpeed unpickles universal checkpoints "
                "without weights_only, so a file planted in train.storage_path could run code"
            )
        return value

    @model_validator(mode="after")
    def _data_fills_a_batch(self) -> "TrainConfig":
        """Refused here, before Ray starts, when train.data's limits cannot give every worker one batch
        (the worker would find out only after the run folder and MLflow run exist)."""
        most = 0  # an upper bound: a split or file may hold fewer than its limit
        for spec in self.data:
            if spec.name == "probes":
                families = spec.options.get("families")  # default: all 6 of hidrop.probes.FAMILIES
                most += (spec.limit or 100) * (len(families) if isinstance(families, list) and families else 6)
            elif spec.limit is None:
                return self  # a whole split or file: its size is known once it is read
            else:
                most += spec.limit
        if most // self.num_workers < self.micro_batch_size:
            raise ValueError(
                f"train.data's limits give at most {most} training samples: not one batch of "
                f"micro_batch_size={self.micro_batch_size} for each of {self.num_workers} workers"
            )
        return self

    @model_validator(mode="after")
    def _lora_stage(self) -> "TrainConfig":
        if self.lora is not None and self.stage != "finetune":
            raise ValueError("lora applies to stage=finetune only")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.eval_after and self.zero_stage == 3:
            raise ValueError(
                "eval_after needs zero_stage <= 2 (ZeRO-3 shards the weights); "
                "score the export with hidrop eval instead"
            )
        return self
