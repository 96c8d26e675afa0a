"""Cost accounting (no torch).

Two figures per schedule:
- `vision_tflops`: the paper's formula over vision tokens only, sum_l 4 n d^2 + 2 n^2 d + 3 n d m
  (method.md section 7). Like the paper it counts multiply-accumulates, so "FLOPs" here = MACs.
- `model_tflops`: the whole forward of one sample in the same MAC convention: every decoder layer over
  text + vision rows (GQA-aware projections, the full n^2 attention the paper formula also assumes),
  the scoring passes, the LM head over the positions that produce logits, and the vision encoder +
  projector. This is the figure wall-clock follows.
"""

from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field

from hidrop.schedule import ConfigModel, Schedule

# Ceilings on shape fields, well above any released model: cost accounting loops over layers and tokens,
# so a typo like 1e8 layers would hang `hidrop flops` instead of being refused
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 18  # hidden and intermediate sizes
MAX_HEADS = 1024
MAX_VOCAB = 10_000_000
MAX_TOKENS = 1 << 20  # vision, text and logits positions


class VisionEncoderShape(ConfigModel):
    """A ViT-style encoder (CLIP ViT-L/14-336 for LLaVA-1.5) or a fixed cost for anything else."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(default=24, gt=0, le=MAX_LAYERS)
    hidden_size: int = Field(default=1024, gt=0, le=MAX_WIDTH)
    intermediate_size: int = Field(default=4096, gt=0, le=MAX_WIDTH)
    num_tokens: int = Field(default=577, gt=0, le=MAX_TOKENS)  # patches + CLS
    fixed_gmacs: Optional[float] = Field(
        default=None, ge=0, le=1e9, description="use this instead of the ViT formula (e.g. a CNN)"
    )

    def macs(self) -> float:
        if self.fixed_gmacs is not None:
            return self.fixed_gmacs * 1e9
        n, d, m = self.num_tokens, self.hidden_size, self.intermediate_size
        return self.num_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


class ModelShape(ConfigModel):
    """The shape that cost accounting (and random-weight benchmarks) need. Defaults: LLaVA-1.5-7B."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(default=32, gt=0, le=MAX_LAYERS)
    hidden_size: int = Field(default=4096, gt=0, le=MAX_WIDTH)
    intermediate_size: int = Field(default=11008, gt=0, le=MAX_WIDTH)
    num_attention_heads: int = Field(default=32, gt=0, le=MAX_HEADS)
    num_key_value_heads: int = Field(default=32, gt=0, le=MAX_HEADS)
    vocab_size: int = Field(default=32000, gt=0, le=MAX_VOCAB)
    num_vision_tokens: int = Field(default=576, gt=0, le=MAX_TOKENS)
    text_tokens: int = Field(default=64, ge=0, le=MAX_TOKENS)  # typical prompt length used for the whole-model figure
    logits_positions: int = Field(default=1, ge=0, le=MAX_TOKENS)  # 1 = inference prefill (generate reads the last row)
    vision_encoder: Optional[VisionEncoderShape] = Field(default_factory=VisionEncoderShape)
    projector_hidden_size: Optional[int] = Field(default=4096, gt=0, le=MAX_WIDTH)  # mlp2x_gelu: d_vis -> d -> d

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads


def paper_layer_macs(n: float, d: int, m: int) -> float:
    """The paper's per-layer cost of n tokens: 4 n d^2 + 2 n^2 d + 3 n d m. Works on floats and tensors."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def vision_tflops(schedule: Schedule, shape: ModelShape) -> float:
    d, m = shape.hidden_size, shape.intermediate_size
    return sum(paper_layer_macs(n, d, m) for n in schedule.tokens_per_layer()) / 1e12


def _decoder_layer_macs(n: int, shape: ModelShape) -> float:
    d, m, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    return 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m


def _scoring_macs(n: int, shape: ModelShape) -> float:
    # one query row: q for it, k for every live row, then one row of scores per head
    d, kv = shape.hidden_size, shape.kv_dim
    return d * d + n * d * kv + n * d


def model_tflops(schedule: Schedule, shape: ModelShape) -> float:
    t = shape.text_tokens
    total = sum(_decoder_layer_macs(t + n, shape) for n in schedule.tokens_per_layer())
    counts = [0] + schedule.tokens_per_layer()
    for drop in schedule.drops:
        total += _scoring_macs(t + counts[drop.after_layer], shape)  # scored before the drop applies
    total += shape.logits_positions * shape.hidden_size * shape.vocab_size
    if shape.vision_encoder is not None:
        total += shape.vision_encoder.macs()
        if shape.projector_hidden_size:
            d_vis = shape.vision_encoder.hidden_size
            total += shape.num_vision_tokens * (
                d_vis * shape.projector_hidden_size + shape.projector_hidden_size * shape.hidden_size
            )
    return total / 1e12


def text_only_tflops(shape: ModelShape) -> float:
    """The same forward with no image at all (the blind baseline): text rows and the LM head only."""
    total = shape.num_layers * _decoder_layer_macs(shape.text_tokens, shape)
    return (total + shape.logits_positions * shape.hidden_size * shape.vocab_size) / 1e12


def cost_report(schedule: Schedule, shape: ModelShape) -> dict:
    """Everything `hidrop flops --json` prints for one schedule."""
    if schedule.num_layers != shape.num_layers or schedule.num_vision_tokens != shape.num_vision_tokens:
        raise ValueError(
            f"schedule is for {schedule.num_layers} layers / {schedule.num_vision_tokens} vision tokens, "
            f"the model has {shape.num_layers} / {shape.num_vision_tokens}"
        )
    vanilla_tokens = [shape.num_vision_tokens] * shape.num_layers
    vanilla_vision = sum(paper_layer_macs(n, shape.hidden_size, shape.intermediate_size) for n in vanilla_tokens) / 1e12
    vt = vision_tflops(schedule, shape)
    return {
        "name": schedule.name,
        "tokens_per_layer": schedule.tokens_per_layer(),
        "avg_vision_tokens": schedule.avg_tokens(),
        "vision_tflops": vt,
        "vision_pct_of_vanilla": 100.0 * vt / vanilla_vision,
        "model_tflops": model_tflops(schedule, shape),
        "plan": schedule.describe(),
    }


def format_tflops(value: Optional[float], decimals: int = 3) -> str:
    """`3.817` (fixed decimals), but significant digits once fixed ones would print a tiny model as 0.000."""
    if value is None or value != value:  # None or NaN
        return "-"
    if value != 0 and abs(value) < 10 ** (2 - decimals):
        return f"{value:.3g}"
    return f"{value:.{decimals}f}"
