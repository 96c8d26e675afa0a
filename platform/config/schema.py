"""The experiment file's schema: one pydantic model per section, `ExperimentConfig` over them all.

The `train:` section is `hidrop_platform.config.training`; reading a YAML file (with `a.b=c` overrides)
into these models is `hidrop_platform.config.loader`. The same dotted names are used by command-line
overrides, Tune search spaces and MLflow params.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hidrop.assets import shipped_path
from hidrop.cost import ModelShape
from hidrop.evaluation.published import load_published
from hidrop.evaluation.registry import known_benchmarks
from hidrop.schedule import (
    CHECKPOINT,
    PRESETS,
    ConfigModel,
    Schedule,
    ScheduleError,
    ScheduleSpec,
    checkpoint_schedule,
    first_error_line,
)
from hidrop_platform.config.training import TrainConfig
from hidrop_platform.storage import check_name

# Shapes of the models that need no checkpoint path, filled in when the YAML gives none.
MINI_LLAVA_SHAPE = dict(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    num_vision_tokens=196,
    text_tokens=48,
    vision_encoder={"fixed_gmacs": 0.3},
    projector_hidden_size=576,
)
# the language model's part of a shape (what a random-weight benchmark builds)
_LM_FIELDS = (
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "num_vision_tokens",
)
TINY_LLAVA_SHAPE = dict(
    num_layers=8,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    num_vision_tokens=16,
    text_tokens=24,
    vision_encoder=None,
    projector_hidden_size=None,
)
DEFAULT_SHAPES = {"mini_llava": MINI_LLAVA_SHAPE, "tiny_llava": TINY_LLAVA_SHAPE}


class ModelConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    # shape: cost accounting only; mini_llava: the offline model (EfficientNet-Lite0 + SmolLM2-135M);
    # llava_hf / llama: a local checkpoint folder; tiny_*: random test models
    kind: Literal["shape", "mini_llava", "llama", "llava_hf", "tiny_llama", "tiny_llava"] = "shape"
    path: Optional[str] = None  # checkpoint folder: llava-hf model, or a saved hidrop model (e.g. trained projector)
    feature: Literal["block10", "head448"] = "block10"  # mini_llava: which EfficientNet grid feeds the projector
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    shape: ModelShape = Field(default_factory=ModelShape)

    @model_validator(mode="before")
    @classmethod
    def _default_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in DEFAULT_SHAPES:
            given = data.get("shape") or {}
            data = {**data, "shape": {**DEFAULT_SHAPES[data["kind"]], **given}}
        return data

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.kind in ("llama", "llava_hf") and not self.path:
            raise ValueError(f"model.kind={self.kind} needs model.path (a local checkpoint folder)")
        return self


class BenchmarkSpec(ConfigModel):
    """One benchmark of the registry; `options` go to its constructor (e.g. families, split)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    limit: Optional[int] = Field(default=None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "BenchmarkSpec":

        if self.name not in known_benchmarks():
            raise ValueError(f"unknown benchmark {self.name!r}; known: {', '.join(known_benchmarks())}")
        return self


class EvalConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=lambda: [BenchmarkSpec(name="easy_vqa", limit=200), BenchmarkSpec(name="probes", limit=20)],
        min_length=1,  # no benchmark: a report with no scores
    )
    baselines: list[Literal["all_tokens", "blind", "random", "oracle"]] = Field(
        default_factory=lambda: ["all_tokens", "blind", "random", "oracle"]
    )
    mode: Literal["auto", "closed", "generate"] = "auto"
    batch_size: int = Field(default=8, gt=0)
    max_new_tokens: int = Field(default=8, gt=0)
    include_compare: bool = True  # also evaluate the `compare` schedules
    device: Optional[str] = None  # default: cuda when available
    # the paper's rows shown beside the measured ones: "auto" (a llava_hf model whose path names
    # LLaVA-1.5-7B), "none", or a model of hidrop/evaluation/published.yaml (llava15_7b, mobilellama_2.7b)
    published: str = "auto"
    published_training: Literal["any", "training_free", "trained", "trained_eval_training_free"] = "any"
    # the benchmarks the relative score averages; default: every benchmark that is not diagnostic (the
    # probes are: scored per family with evidence recall, but not averaged in; list them here to be)
    relative: Optional[list[str]] = None
    # leave benchmarks where all tokens is not significantly above blind out of `hidrop eval`'s relative score
    require_signal: bool = True
    resamples: int = Field(default=1000, ge=100)  # bootstrap resamples behind every interval

    @model_validator(mode="after")
    def _known_published(self) -> "EvalConfig":

        if self.relative is not None:
            names = [b.name for b in self.benchmarks]
            unknown = [b for b in self.relative if b not in names]
            if unknown or not self.relative:
                raise ValueError(f"relative={self.relative}: name benchmarks of eval.benchmarks ({', '.join(names)})")
        known = ["auto", "none", *sorted(load_published().models)]
        if self.published not in known:
            raise ValueError(f"published={self.published!r} is not a published model; choose from {', '.join(known)}")
        return self


class BenchConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, gt=0)
    text_tokens: int = Field(default=64, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    warmup: int = Field(default=2, ge=0)
    repeats: int = Field(default=5, gt=0)
    new_tokens: int = Field(default=32, gt=0)  # bench generate: greedy tokens per sample (no early stop)
    # ratios are to vanilla (else the first row): an empty list would print 1.00x against nothing run
    methods: list[str] = Field(default_factory=lambda: ["vanilla", "fastv", "pdrop", "hidrop_tok64"], min_length=1)
    # used when the run is on a CPU and the experiment's shape is too large for it (the mini-LLaVA LM)
    cpu_shape: ModelShape = Field(
        default_factory=lambda: ModelShape(**{k: MINI_LLAVA_SHAPE[k] for k in _LM_FIELDS}, vision_encoder=None)
    )
    cpu_batch_size: int = Field(default=2, gt=0)

    @model_validator(mode="after")
    def _known_methods(self) -> "BenchConfig":

        unknown = [m for m in self.methods if m not in PRESETS]
        if unknown:
            raise ValueError(f"methods: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
        return self


class TrackingConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    uri: Optional[str] = None  # None: a local sqlite store under ./mlruns; a cluster: http://host:5000
    experiment: Optional[str] = None  # None: the experiment's name

    @field_validator("uri")
    @classmethod
    def _absolute_sqlite(cls, uri: Optional[str]) -> Optional[str]:
        # Ray workers run in their trial folders: a relative sqlite path would open another database there
        prefix = "sqlite:///"
        if uri and uri.lower().startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            path, _, query = uri[len(prefix) :].partition("?")
            uri = prefix + Path(path).resolve().as_posix() + ("?" + query if query else "")
        return uri


MAX_INT_BOUND = 10**9  # of a searched int range
MAX_GRID_POINTS = 100_000  # grid search lists every point before the first trial


class Dimension(ConfigModel):
    """One searched knob: `{choice: [...]}`, `{int: [lo, hi]}` (inclusive, optional step) or `{float: [lo, hi]}`
    (optional log)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    choice: Optional[list[Any]] = None
    int_range: Optional[tuple[int, int]] = Field(default=None, alias="int")
    float_range: Optional[tuple[float, float]] = Field(default=None, alias="float")
    step: Optional[int] = Field(default=None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        given = [k for k in ("choice", "int_range", "float_range") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice / int / float")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for rng in (self.int_range, self.float_range):
            if rng is not None and rng[0] > rng[1]:
                raise ValueError(f"range {list(rng)} has low > high")
        if self.int_range is not None and max(map(abs, self.int_range)) > MAX_INT_BOUND:
            # searched ints are layers, tokens, steps; Optuna and numpy draw them as 64-bit integers
            raise ValueError(f"int range {list(self.int_range)}: bounds must lie within +-{MAX_INT_BOUND}")
        if self.step is not None and self.int_range is None:
            raise ValueError("step applies to int ranges only")
        if self.log and (self.float_range is None or self.float_range[0] <= 0):
            raise ValueError("log needs a float range above 0")
        return self

    @property
    def discrete(self) -> bool:
        return self.float_range is None

    def values(self) -> list[Any]:
        """Every value (grid search); float ranges have none."""
        if self.choice is not None:
            return list(self.choice)
        if self.int_range is not None:
            return list(range(self.int_range[0], self.int_range[1] + 1, self.step or 1))
        raise ValueError("a float range has no finite set of values")


class ConfirmConfig(ConfigModel):
    """Held-out confirmation (the winner's curse): after the search, the seeds and the top_k front trials
    are re-evaluated on questions the search never saw, into their own runs (confirm/... metrics)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=0)  # searched front trials, best relative score first
    # default: each search benchmark with twice its limit; every question the search saw is removed
    benchmarks: Optional[list[BenchmarkSpec]] = None
    limit_factor: int = Field(default=2, ge=2)  # the default's limit multiplier


class FidelityConfig(ConfigModel):
    """Multi-fidelity search of training-free trials: `rungs` rounds on 1/factor^(rungs-1), ..., 1/factor, 1
    of each benchmark's questions (nested: no question is scored twice). After each rung, `promotion`
    "halving" keeps the best 1/factor of the trials by what they add to the front; "interval" stops
    only the trials behind the front beyond their interval, and caps the promotion into the last rung at
    1/factor (hidrop_platform.tune.rungs)."""

    model_config = ConfigDict(extra="forbid")

    rungs: int = Field(default=3, ge=2)
    factor: int = Field(default=3, ge=2)
    promotion: Literal["halving", "interval"] = "halving"
    # seeds run every rung, whatever their rank; off by default: they compete like any trial, and
    # tune.confirm scores them on held-out questions anyway
    promote_seeds: bool = False


class SweepConfig(ConfigModel):
    """`hidrop tune`: what is searched (dotted config names -> dimensions), how, and with what resources."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None  # the sweep's folder and parent MLflow run; default: the experiment's name

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: Optional[str]) -> Optional[str]:
        return None if name is None else check_name(name)

    kind: Literal["training_free", "trained"] = "training_free"
    algorithm: Literal["grid", "random", "optuna"] = "optuna"
    # pareto: maximize relative score and minimize vision TFLOPs (multi-objective);
    # score: maximize relative score among schedules under max_vision_tflops
    objective: Literal["pareto", "score"] = "pareto"
    max_vision_tflops: Optional[float] = Field(default=None, gt=0)
    num_samples: int = Field(default=16, gt=0)  # searched trials (grid: every valid point instead)
    # evaluated first: preset names or schedule mappings (e.g. one proposed by `hidrop analyze`)
    seeds: list[Any] = Field(default_factory=lambda: ["vanilla", "fastv", "pdrop", "hidrop_tok64"])
    space: dict[str, Dimension] = Field(default_factory=dict)
    resources_per_trial: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    max_concurrent: Optional[int] = Field(default=None, gt=0)  # default: as many trials as the cluster fits
    max_failures: int = Field(default=1, ge=0)  # retries of a trial that raises
    max_rejections: int = Field(default=2000, gt=0)  # invalid samples in a row before the search gives up
    storage_path: str = "runs/tune"
    ray_address: Optional[str] = None
    # trained trials: a short finetune (train section's optimizer settings) with evaluations for ASHA
    train_steps: int = Field(default=20, gt=0)
    eval_every: int = Field(default=5, gt=0)
    # ... after a stage 1 of align_steps (0: none) training the projector alone at align_lr (LLaVA's stage-1
    # rate), both with the trial's schedule active
    align_steps: int = Field(default=0, ge=0)
    align_lr: float = Field(default=1e-3, gt=0)
    grace_period: int = Field(default=1, gt=0)  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = Field(default=2, gt=1)
    confirm: Optional[ConfirmConfig] = None
    fidelity: Optional[FidelityConfig] = None  # training-free trials only

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        if self.objective == "score" and self.max_vision_tflops is None:
            raise ValueError("objective=score needs max_vision_tflops (the budget)")
        if self.algorithm == "grid":
            floats = [k for k, d in self.space.items() if not d.discrete]
            if floats:
                raise ValueError(f"grid search needs choice or int dimensions; {floats} are float ranges")
            points = 1
            for d in self.space.values():
                lo, hi = d.int_range or (0, len(d.choice) - 1)
                points *= len(range(lo, hi + 1, d.step or 1))
            if points > MAX_GRID_POINTS:
                raise ValueError(f"grid search over {points} points; at most {MAX_GRID_POINTS} (narrow tune.space)")
        if self.fidelity is not None and self.kind != "training_free":
            raise ValueError("tune.fidelity applies to training_free trials (trained ones use ASHA on eval_every)")
        if self.confirm is not None and self.kind != "training_free":
            raise ValueError(
                "tune.confirm applies to training_free trials (a trained trial's score belongs to its finetuned model)"
            )
        if self.align_steps and self.kind != "trained":
            raise ValueError("tune.align_steps applies to trained trials (tune.kind: trained)")
        if self.kind == "trained" and self.eval_every > self.train_steps:
            raise ValueError(f"eval_every={self.eval_every} is more than train_steps={self.train_steps}")
        if not self.space and self.algorithm != "grid" and not self.seeds:
            raise ValueError("nothing to search: give space or seeds")
        return self


class AnalyzeConfig(ConfigModel):
    """`hidrop analyze`: layer diagnostics on a calibration set drawn from eval.benchmarks."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(default=32, gt=0)  # calibration samples for the layer curves
    # per benchmark, for the exit / injection sweeps; None: the smallest of 48, 96, ... (at most
    # sweep_samples_max) at which all tokens is significantly above blind on this model
    sweep_samples: Optional[int] = Field(default=None, gt=0)
    sweep_samples_max: int = Field(default=768, gt=0)
    sweeps: bool = True
    sweep_stride: int = Field(default=1, gt=0)
    ilvas_k: list[int] = Field(default_factory=lambda: [5, 20, 50])
    ilvas_n: list[int] = Field(default_factory=lambda: [4, 8])
    reference: Literal["gray", "shuffled"] = "gray"  # the reference image of S_cross
    batch_size: int = Field(default=8, gt=0)
    avg_tokens: Optional[float] = Field(default=None, gt=0)  # budget of the proposal; default 64/576 of the tokens
    stages: int = Field(default=4, gt=0)
    keep_decay: float = Field(default=0.5, gt=0, lt=1)
    exit_tolerance: float = Field(default=2.0, ge=0)  # score points below all tokens that still count as the plateau
    onset_fraction: float = Field(default=0.1, gt=0, lt=1)
    output: str = "runs/analyze"


class ExperimentConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleSpec = Field(default_factory=lambda: ScheduleSpec(preset="vanilla"))
    compare: list[ScheduleSpec] = Field(default_factory=list)  # extra schedules for tables and benches
    bench: BenchConfig = Field(default_factory=BenchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: SweepConfig = Field(default_factory=SweepConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    seed: int = Field(default=0, ge=0, lt=2**32)  # Optuna's sampler seeds numpy's RandomState: 32 bits

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_name(name)  # the run's folder under storage_path: one plain component

    @model_validator(mode="after")
    def _precision_matches_weights(self) -> "ExperimentConfig":
        if self.train.precision == "fp32" and self.model.dtype != "float32" and self.model.kind != "shape":
            raise ValueError(
                f"train.precision=fp32 needs model.dtype=float32 (got {self.model.dtype}): "
                "AdamW on half-precision weights loses small updates; use train.precision=bf16"
            )
        reserved = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16"}
        clash = sorted(reserved & set(self.train.deepspeed))
        if clash:
            raise ValueError(
                f"train.deepspeed must not set {clash}: use train.micro_batch_size / grad_accum / precision"
            )
        return self

    @model_validator(mode="after")
    def _space_names_fields(self) -> "ExperimentConfig":
        for key in self.tune.space:
            if not names_a_field(key):
                raise ValueError(
                    f"tune.space: {key!r} does not name a config field (use dotted names, e.g. schedule.inject_layer)"
                )
            if key.split(".")[0] in ("tune", "name"):
                raise ValueError(f"tune.space: {key!r} cannot be searched")
        shape = self.model.shape
        for i, seed in enumerate(self.tune.seeds):
            if not isinstance(seed, (str, dict)):
                raise ValueError(f"tune.seeds.{i}: give a preset name or a schedule mapping")
            try:  # a seed that cannot resolve would cost a failed trial (and a traceback) later
                spec = ScheduleSpec(preset=seed) if isinstance(seed, str) else ScheduleSpec.model_validate(seed)
                spec.resolve(shape.num_layers, shape.num_vision_tokens, self.saved_schedule(spec))
            except ValidationError as err:
                raise ValueError(f"tune.seeds.{i}: {first_error_line(err)}") from None
            except ScheduleError as err:
                raise ValueError(f"tune.seeds.{i}: {err}") from None
        return self

    @model_validator(mode="after")
    def _schedules_resolve(self) -> "ExperimentConfig":
        self.schedules()  # raise now, with the field named, rather than deep inside a run
        return self

    def saved_schedule(self, spec: Optional[ScheduleSpec] = None) -> Optional[Schedule]:
        """The schedule model.path's checkpoint carries (what `preset: checkpoint` names), read from its
        config.json only when `spec` asks for it (or always without a spec)."""
        if spec is not None and spec.preset != CHECKPOINT or not self.model.path:
            return None
        folder = Path(self.model.path)
        if not folder.exists():
            folder = shipped_path(self.model.path) or folder
        return checkpoint_schedule(folder)

    def schedules(self) -> list[Schedule]:
        shape = self.model.shape
        out = []
        for where, spec in [("schedule", self.schedule)] + [(f"compare.{i}", s) for i, s in enumerate(self.compare)]:
            try:
                out.append(spec.resolve(shape.num_layers, shape.num_vision_tokens, self.saved_schedule(spec)))
            except ValidationError as err:
                raise ScheduleError(f"{where}: {first_error_line(err)}") from None
            except ScheduleError as err:
                raise ScheduleError(f"{where}: {err}") from None
        return out

    @property
    def main_schedule(self) -> Schedule:
        return self.schedules()[0]


def names_a_field(dotted: str) -> bool:
    """Whether `a.b.c` names a field of ExperimentConfig (list items by index; free-form dicts accept any key)."""

    node: Any = ExperimentConfig
    for part in dotted.split("."):
        while True:  # unwrap Optional[...] / list[...] / dict[...]
            origin = typing.get_origin(node)
            if origin in (typing.Union, types.UnionType):
                node = next(a for a in typing.get_args(node) if a is not type(None))
            elif origin in (list, tuple):
                if not part.isdigit():
                    return False
                node = typing.get_args(node)[0]
                break
            elif origin is dict or node is Any:
                return True
            else:
                break
        if origin in (list, tuple):
            continue
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return False
            node = node.model_fields[part].annotation
        else:
            return False
    return True
