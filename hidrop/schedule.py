"""Vision-token schedules as plain data (no torch).

One type, `Schedule`, expresses vanilla, FastV, PyramidDrop and HiDrop. Layers are 1-indexed as in the
paper (L1..L_N); code that indexes `nn.ModuleList`s uses `idx = L - 1`.

Conventions (method.md sections 1-4), made explicit because the paper's prose and code differ:
- `inject_layer` is the FIRST layer that sees vision tokens (HiDrop Tok64: 9). Vanilla: 1.
- `exit_layer` is the FIRST layer that sees NO vision tokens (HiDrop: 25, as in the released code:
  vision leaves before L25 runs). `None` means vision stays to the end.
- A drop event `after_layer=l` prunes between layer l and layer l+1, so layer l+1 is the first layer
  with the reduced count. It is scored with the q/k projections of `score_layer` applied to that layer's
  INPUT hidden states: `l + 1` for PDrop/HiDrop (the next layer), `l` for FastV (layer K's own
  attention).
- `keep` is an absolute number of vision tokens, `keep_ratio` a fraction of the ORIGINAL count
  (PDrop's 50% / 25% / 12.5%), resolved as floor(ratio * N + 0.5).
"""

from __future__ import annotations

import json
import math
import typing
from enum import Enum
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hidrop.errors import UserError


class PositionMode(str, Enum):
    persistent = "persistent"  # every token keeps its unpruned position id (HiDrop, FastV inplace)
    compacted = "compacted"  # positions renumbered 0..len-1 after every change (PDrop)
    group = "group"  # text numbered as if the image were absent; vision numbered from the image start


class QueryRule(str, Enum):
    last_prompt = "last_prompt"  # the last prompt token: in training, the token before the first answer
    multi_round = "multi_round"  # every token right before an answer span (training); last_prompt without labels


class Selector(str, Enum):
    hard = "hard"  # plain top-k, no gradient path
    dtopk = "dtopk"  # DTop-K as released: hard forward, soft straight-through mask, fixed ratio
    dtopk_learnable = "dtopk_learnable"  # DTop-K with a learnable ratio per filtering layer + budget loss


class ScheduleError(UserError, ValueError):
    """An impossible schedule. The message names the offending field."""


def first_error_line(err: ValidationError) -> str:
    """A pydantic error as one line: the first error's field and message, not the multi-line banner."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _leaf_types(annotation) -> set:
    args = typing.get_args(annotation)
    if not args or typing.get_origin(annotation) is typing.Literal:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


class ConfigModel(BaseModel):
    """Base of every YAML-facing model: unknown keys, `true` for a number (YAML's booleans are also ints
    to pydantic) and inf/NaN are errors, not silently accepted values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value, info):
        if isinstance(value, bool):
            leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
            if leaves & {int, float} and not leaves & {bool, typing.Any}:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class DropEvent(ConfigModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    after_layer: int = Field(description="prune between this layer and the next (1-indexed)")
    keep: Optional[int] = Field(default=None, description="vision tokens kept (absolute)")
    keep_ratio: Optional[float] = Field(default=None, description="fraction of the ORIGINAL vision tokens kept")
    score_layer: Optional[int] = Field(
        default=None, description="layer whose q/k score the tokens (default after_layer + 1)"
    )

    @model_validator(mode="after")
    def _one_keep(self) -> "DropEvent":
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of keep / keep_ratio")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep={self.keep} must be >= 1 (use exit_layer to remove all vision tokens)")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={self.keep_ratio} must be in (0, 1]")
        return self

    @property
    def scored_by(self) -> int:
        return self.after_layer + 1 if self.score_layer is None else self.score_layer

    def keep_count(self, num_vision_tokens: int) -> int:
        if self.keep is not None:
            return self.keep
        return max(1, math.floor(self.keep_ratio * num_vision_tokens + 0.5))


class Schedule(BaseModel):
    """A per-layer plan for the vision tokens of one model shape. Validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: int = Field(gt=0)
    num_vision_tokens: int = Field(gt=0)
    inject_layer: int = 1
    exit_layer: Optional[int] = None
    drops: tuple[DropEvent, ...] = ()
    position_mode: PositionMode = PositionMode.persistent
    query_rule: QueryRule = QueryRule.last_prompt
    selector: Selector = Selector.dtopk
    name: str = "custom"

    @model_validator(mode="after")
    def _check(self) -> "Schedule":
        n_layers, n_vis = self.num_layers, self.num_vision_tokens
        if not 1 <= self.inject_layer <= n_layers:
            raise ScheduleError(f"inject_layer={self.inject_layer} must be within 1..{n_layers} (the model depth)")
        end = self.vision_end
        if self.exit_layer is not None:
            if self.exit_layer > n_layers:
                raise ScheduleError(
                    f"exit_layer={self.exit_layer} is beyond the model depth {n_layers} "
                    "(omit it to keep vision to the end)"
                )
            if self.exit_layer <= self.inject_layer:
                raise ScheduleError(f"exit_layer={self.exit_layer} must come after inject_layer={self.inject_layer}")
        previous_after, previous_keep = None, n_vis
        for i, drop in enumerate(self.drops):
            where = f"drops[{i}]"
            if drop.after_layer > n_layers:
                raise ScheduleError(f"{where}.after_layer={drop.after_layer} is beyond the model depth {n_layers}")
            # The drop must happen while vision tokens are present and leave at least one layer to use it.
            if not self.inject_layer <= drop.after_layer < end - 1:
                raise ScheduleError(
                    f"{where}.after_layer={drop.after_layer} is outside the vision window: it must be in "
                    f"{self.inject_layer}..{end - 2} (inject_layer={self.inject_layer}, exit_layer={self.exit_layer})"
                )
            if previous_after is not None and drop.after_layer <= previous_after:
                raise ScheduleError(
                    f"{where}.after_layer={drop.after_layer} must be after the previous drop ({previous_after})"
                )
            if drop.scored_by not in (drop.after_layer, drop.after_layer + 1):
                raise ScheduleError(
                    f"{where}.score_layer={drop.scored_by} must be {drop.after_layer} (own attention, FastV) "
                    f"or {drop.after_layer + 1} (next layer, PDrop/HiDrop)"
                )
            keep = drop.keep_count(n_vis)
            if keep > n_vis:
                raise ScheduleError(f"{where}.keep={keep} is larger than the number of vision tokens ({n_vis})")
            if keep >= previous_keep:
                raise ScheduleError(
                    f"{where}.keep={keep} must be smaller than the previous count ({previous_keep}): "
                    "keep counts decrease"
                )
            previous_after, previous_keep = drop.after_layer, keep
        return self

    # ---- derived views -------------------------------------------------------------------------
    @property
    def vision_end(self) -> int:
        """One past the last layer that sees vision (exit_layer, or num_layers + 1)."""
        return self.num_layers + 1 if self.exit_layer is None else self.exit_layer

    @property
    def keep_counts(self) -> list[int]:
        return [d.keep_count(self.num_vision_tokens) for d in self.drops]

    def tokens_per_layer(self) -> list[int]:
        """n_l for l = 1..num_layers: vision tokens that ENTER layer l."""
        counts = []
        for layer in range(1, self.num_layers + 1):
            if layer < self.inject_layer or layer >= self.vision_end:
                counts.append(0)
                continue
            n = self.num_vision_tokens
            for drop, keep in zip(self.drops, self.keep_counts):
                if layer > drop.after_layer:
                    n = keep
            counts.append(n)
        return counts

    def avg_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)

    def is_vanilla(self) -> bool:
        return self.inject_layer == 1 and self.exit_layer is None and not self.drops

    def boundaries(self) -> list[int]:
        """0-indexed layer indices at which the live token set changes (a new stage starts)."""
        points = {self.inject_layer - 1} if self.inject_layer > 1 else set()
        points |= {d.after_layer for d in self.drops}  # 0-indexed index of layer after_layer + 1
        if self.exit_layer is not None:
            points.add(self.exit_layer - 1)
        return sorted(points)

    def describe(self) -> str:
        runs, counts = [], self.tokens_per_layer()
        start = 0
        for i in range(1, len(counts) + 1):
            if i == len(counts) or counts[i] != counts[start]:
                runs.append(f"{counts[start]}x{i - start}")
                start = i
        return ", ".join(runs)

    def scaled_to(self, num_layers: int, num_vision_tokens: Optional[int] = None) -> "Schedule":
        """The same schedule at another depth (and vision-token count).

        Layer numbers scale by relative depth, with every event kept strictly ordered; absolute keep
        counts scale by the vision-token ratio (ratios are unchanged).
        """
        n_vis = self.num_vision_tokens if num_vision_tokens is None else num_vision_tokens
        if num_layers == self.num_layers and n_vis == self.num_vision_tokens:
            return self

        def scale(layer: int) -> int:
            # layer l covers relative depth ((l-1)/N, l/N]; keep its start point.
            return int(math.floor((layer - 1) * num_layers / self.num_layers + 0.5)) + 1

        inject = scale(self.inject_layer)

        def rel(layer: int) -> int:
            # later boundaries scale as distances from the injection layer, so the widths of the stages
            # (and the average token count) stay close to the original instead of compounding rounding
            return inject + int(math.floor((layer - self.inject_layer) * num_layers / self.num_layers + 0.5))

        end = num_layers + 1 if self.exit_layer is None else min(max(rel(self.exit_layer), inject + 1), num_layers)
        if self.drops and end - inject < 2:  # a drop needs a layer before it and one after it inside the window
            end = inject + 2
            if end > num_layers + 1:
                inject, end = max(1, num_layers - 1), num_layers + 1
        events: list[DropEvent] = []
        for drop in self.drops:
            after = min(max(rel(drop.after_layer + 1) - 1, inject), end - 2)
            if after < inject:
                raise ScheduleError(
                    f"cannot scale {self.name!r} to {num_layers} layers: "
                    f"no room for drops between layers {inject} and {end}"
                )
            keep = drop.keep
            if keep is not None and n_vis != self.num_vision_tokens:
                keep = max(1, math.floor(keep * n_vis / self.num_vision_tokens + 0.5))
            score = None if drop.score_layer is None else (after if drop.score_layer == drop.after_layer else after + 1)
            event = DropEvent(after_layer=after, keep=keep, keep_ratio=drop.keep_ratio, score_layer=score)
            # Events that land on the same layer merge into the later (smaller) one; an event whose
            # count no longer decreases after rounding is redundant and dropped.
            if events and after <= events[-1].after_layer:
                events[-1] = event
                while len(events) > 1 and events[-1].keep_count(n_vis) >= events[-2].keep_count(n_vis):
                    events.pop(-2)
            elif events and event.keep_count(n_vis) >= events[-1].keep_count(n_vis):
                continue
            elif event.keep_count(n_vis) >= n_vis:
                continue
            else:
                events.append(event)
        return Schedule(
            num_layers=num_layers,
            num_vision_tokens=n_vis,
            inject_layer=inject,
            exit_layer=None if end > num_layers else end,
            drops=tuple(events),
            position_mode=self.position_mode,
            query_rule=self.query_rule,
            selector=self.selector,
            name=self.name,
        )


# ---- presets: the rows of method.md section 1 --------------------------------------------------


def vanilla(num_layers: int = 32, num_vision_tokens: int = 576) -> Schedule:
    return Schedule(num_layers=num_layers, num_vision_tokens=num_vision_tokens, name="vanilla")


def fastv(k: int = 2, r: float = 0.5, num_layers: int = 32, num_vision_tokens: int = 576) -> Schedule:
    """FastV: score with layer K's own attention, drop R of the vision tokens after layer K."""
    return Schedule(
        num_layers=num_layers,
        num_vision_tokens=num_vision_tokens,
        drops=(DropEvent(after_layer=k, keep_ratio=1.0 - r, score_layer=k),),
        selector=Selector.hard,
        name=f"fastv_k{k}_r{int(round(r * 100))}",
    )


def pdrop(
    layers: tuple[int, ...] = (8, 16, 24),
    ratio: float = 0.5,
    num_layers: int = 32,
    num_vision_tokens: int = 576,
) -> Schedule:
    """PyramidDrop: after each listed layer keep `ratio` of the previous stage (of the original: ratio^i)."""
    return Schedule(
        num_layers=num_layers,
        num_vision_tokens=num_vision_tokens,
        drops=tuple(DropEvent(after_layer=l, keep_ratio=ratio ** (i + 1)) for i, l in enumerate(layers)),
        position_mode=PositionMode.compacted,
        selector=Selector.hard,
        name="pdrop",
    )


_HIDROP_32 = {
    # name: (inject, exit, drop layers, keeps) on a 32-layer, 576-token model (released schedules)
    "tok48": (9, 25, (10, 14, 16, 18), (87, 10, 5, 1)),
    "tok64": (9, 25, (10, 14, 16, 18), (215, 10, 5, 1)),
    "tok80": (9, 25, (10, 13, 16, 19), (453, 10, 5, 1)),
}


def hidrop(variant: str = "tok64", num_layers: int = 32, num_vision_tokens: int = 576) -> Schedule:
    """HiDrop's released schedules for LLaVA-1.5-7B, scaled to other shapes by relative depth."""
    if variant not in _HIDROP_32:
        raise ScheduleError(f"unknown HiDrop variant {variant!r}; choose from {sorted(_HIDROP_32)}")
    inject, exit_layer, layers, keeps = _HIDROP_32[variant]
    base = Schedule(
        num_layers=32,
        num_vision_tokens=576,
        inject_layer=inject,
        exit_layer=exit_layer,
        drops=tuple(DropEvent(after_layer=l, keep=k) for l, k in zip(layers, keeps)),
        name=f"hidrop_{variant}",
    )
    return base.scaled_to(num_layers, num_vision_tokens)


def hidrop_mobilellama(keeps: tuple[int, ...] = (215, 10, 5, 1), num_vision_tokens: int = 576) -> Schedule:
    """The paper's MobileLLaMA-2.7B setting (32 layers): inject 15, exit 28, filtering {16, 19, 22, 25}."""
    return Schedule(
        num_layers=32,
        num_vision_tokens=num_vision_tokens,
        inject_layer=15,
        exit_layer=28,
        drops=tuple(DropEvent(after_layer=l, keep=k) for l, k in zip((16, 19, 22, 25), keeps)),
        name="hidrop_mobilellama",
    )


PRESETS = {
    "vanilla": lambda n, v: vanilla(n, v),
    # built at the paper's shape, then scaled, so that events made redundant by a small token count merge
    "fastv": lambda n, v: fastv(2, 0.5).scaled_to(n, v),
    "pdrop": lambda n, v: pdrop().scaled_to(n, v),
    "hidrop_tok48": lambda n, v: hidrop("tok48", n, v),
    "hidrop_tok64": lambda n, v: hidrop("tok64", n, v),
    "hidrop_tok80": lambda n, v: hidrop("tok80", n, v),
    "hidrop_mobilellama": lambda n, v: hidrop_mobilellama().scaled_to(n, v),
}


CHECKPOINT = "checkpoint"  # the preset name for "the schedule the model's checkpoint carries"


def checkpoint_schedule(folder: str | Path) -> Optional[Schedule]:
    """The schedule a checkpoint folder carries (config.json's `hidrop.schedule`, as
    `VisionLanguageModel.save` writes it: learned keep counts included), None when it has none. Reads
    only the JSON: no model is loaded. Raises ScheduleError for a file that is not such a config."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text()).get("hidrop") or {}
        return Schedule.model_validate(meta["schedule"]) if meta.get("schedule") else None
    except (json.JSONDecodeError, AttributeError) as e:
        raise ScheduleError(f"{path}: not a readable checkpoint config ({e})") from None
    except ValidationError as e:
        raise ScheduleError(f"{path}: hidrop.schedule.{first_error_line(e)}") from None


def preset(name: str, num_layers: int = 32, num_vision_tokens: int = 576) -> Schedule:
    """A named preset at the given depth and vision-token count."""
    if name not in PRESETS:
        raise ScheduleError(f"unknown schedule preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    if num_layers < 1 or num_vision_tokens < 1:
        raise ScheduleError(f"preset {name!r} needs num_layers >= 1 and num_vision_tokens >= 1")
    try:
        return PRESETS[name](num_layers, num_vision_tokens)
    except ValidationError as err:
        raise ScheduleError(
            f"preset {name!r} at {num_layers} layers / {num_vision_tokens} tokens: {err.errors()[0]['msg']}"
        ) from None


# ---- the curve form: a schedule from a few numbers (what searches sample) -----------------------


def spread_layers(inject_layer: int, vision_end: int, stages: int) -> list[int]:
    """`stages` filtering layers spread evenly over the vision window, the first right after injection.

    A drop may follow any layer in inject_layer..vision_end-2 (it needs one layer before and after it).
    """
    positions = vision_end - 1 - inject_layer
    if stages < 0:
        raise ScheduleError(f"stages={stages} must be >= 0")
    if stages > positions:
        raise ScheduleError(
            f"stages={stages} do not fit: the vision window (layers {inject_layer}..{vision_end - 1}) has room "
            f"for {max(positions, 0)} filtering layer(s)"
        )
    return [inject_layer + (i * positions) // stages for i in range(stages)]


def keep_curve(
    first_keep: int, stages: int, keep_decay: float = 0.5, tail_keeps: Optional[list[int]] = None
) -> list[int]:
    """Keep counts of a pyramid: the first stage keeps `first_keep`, each later stage `keep_decay` of the
    previous one (rounded; at least one less, and enough left for the stages after it), or `tail_keeps`."""
    if stages == 0:
        return []
    if tail_keeps is not None:
        if len(tail_keeps) != stages - 1:
            raise ScheduleError(f"tail_keeps has {len(tail_keeps)} entries; {stages} stages need {stages - 1}")
        return [first_keep, *tail_keeps]
    if not 0.0 < keep_decay < 1.0:
        raise ScheduleError(f"keep_decay={keep_decay} must be in (0, 1)")
    keeps = [first_keep]
    for i in range(1, stages):
        floor_for_rest = stages - i  # later stages still need to decrease by one each
        keeps.append(max(floor_for_rest, min(keeps[-1] - 1, int(math.floor(keeps[-1] * keep_decay + 0.5)))))
    return keeps


def pyramid(
    num_layers: int,
    num_vision_tokens: int,
    *,
    inject_layer: int = 1,
    exit_layer: Optional[int] = None,
    drop_layers: Optional[list[int]] = None,
    stages: Optional[int] = None,
    first_keep_ratio: Optional[float] = None,
    avg_tokens: Optional[float] = None,
    keep_decay: float = 0.5,
    tail_keeps: Optional[list[int]] = None,
    **fields,
) -> Schedule:
    """A pruning pyramid from its window, its filtering layers and its keep curve.

    Filtering layers: `drop_layers` explicitly, or `stages` spread over the window. First keep:
    `first_keep_ratio` of the original tokens, or solved so that the average per layer is closest to
    `avg_tokens` (HiDrop's Tok48/64/80 differ only there). Later keeps: `tail_keeps`, or `keep_decay`.
    Raises ScheduleError, naming the field, for anything impossible (nothing is clamped silently).
    """
    end = num_layers + 1 if exit_layer is None else exit_layer
    if drop_layers is None:
        if stages is None:
            raise ScheduleError("give drop_layers or stages")
        drop_layers = spread_layers(inject_layer, end, stages)
    elif stages is not None and stages != len(drop_layers):
        raise ScheduleError(f"stages={stages} but drop_layers has {len(drop_layers)} entries")
    k = len(drop_layers)
    lowest = k if tail_keeps is None else (max(tail_keeps) + 1 if tail_keeps else 1)

    def build(first: int) -> Schedule:
        keeps = keep_curve(first, k, keep_decay, tail_keeps)
        drops = tuple(DropEvent(after_layer=l, keep=n) for l, n in zip(drop_layers, keeps))
        return Schedule(
            num_layers=num_layers,
            num_vision_tokens=num_vision_tokens,
            inject_layer=inject_layer,
            exit_layer=exit_layer,
            drops=drops,
            **fields,
        )

    if k == 0:
        if first_keep_ratio is not None or avg_tokens is not None:
            raise ScheduleError("first_keep_ratio / avg_tokens need at least one filtering layer")
        return build(0)
    if (first_keep_ratio is None) == (avg_tokens is None):
        raise ScheduleError("give exactly one of first_keep_ratio / avg_tokens")
    if first_keep_ratio is not None:
        if not 0.0 < first_keep_ratio < 1.0:
            raise ScheduleError(f"first_keep_ratio={first_keep_ratio} must be in (0, 1)")
        first = int(math.floor(first_keep_ratio * num_vision_tokens + 0.5))
        if not lowest <= first < num_vision_tokens:
            raise ScheduleError(
                f"first_keep_ratio={first_keep_ratio} keeps {first} of {num_vision_tokens} tokens; "
                f"{k} stage(s) need {lowest}..{num_vision_tokens - 1}"
            )
        return build(first)
    # avg_tokens: the average grows with the first keep, so search the integer first keep
    if lowest >= num_vision_tokens:
        raise ScheduleError(f"{k} stage(s) cannot fit under {num_vision_tokens} vision tokens")
    low, high = build(lowest).avg_tokens(), build(num_vision_tokens - 1).avg_tokens()
    if not low - 0.5 <= avg_tokens <= high + 0.5:
        raise ScheduleError(
            f"avg_tokens={avg_tokens:g} is unreachable with this window and these filtering layers: "
            f"they allow {low:.1f}..{high:.1f}"
        )
    lo, hi = lowest, num_vision_tokens - 1
    while lo < hi:  # the smallest first keep whose average reaches the target
        mid = (lo + hi) // 2
        if build(mid).avg_tokens() < avg_tokens:
            lo = mid + 1
        else:
            hi = mid
    best = min({max(lowest, lo - 1), lo}, key=lambda f: (abs(build(f).avg_tokens() - avg_tokens), f))
    return build(best)


# ---- the YAML forms of a schedule -------------------------------------------------------------------
CURVE_FIELDS = ("drop_layers", "stages", "first_keep_ratio", "avg_tokens", "keep_decay", "tail_keeps")


class ScheduleSpec(ConfigModel):
    """A schedule as written in YAML: a preset (optionally adjusted), explicit fields, or the curve form.

    The curve form (what `hidrop tune` samples) replaces `drops` by a few numbers: the filtering layers
    (`drop_layers`, or `stages` spread over the window) and the keep curve (`first_keep_ratio` or
    `avg_tokens` for the first stage; `keep_decay` or `tail_keeps` for the rest). See `hidrop.schedule.pyramid`.
    """

    model_config = ConfigDict(extra="forbid")

    preset: Optional[str] = None
    name: Optional[str] = None
    inject_layer: Optional[int] = None
    exit_layer: Optional[int] = None
    drops: Optional[list[DropEvent]] = None
    position_mode: Optional[PositionMode] = None
    query_rule: Optional[QueryRule] = None
    selector: Optional[Selector] = None
    drop_layers: Optional[list[int]] = None
    stages: Optional[int] = Field(default=None, ge=0)
    first_keep_ratio: Optional[float] = None
    avg_tokens: Optional[float] = Field(default=None, gt=0)
    keep_decay: Optional[float] = None
    tail_keeps: Optional[list[int]] = None

    @field_validator("preset")
    @classmethod
    def _preset_named(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():  # "" would silently mean "no preset": all tokens
            known = ", ".join(sorted([*PRESETS, CHECKPOINT]))
            raise ValueError(f"an empty preset name; choose from {known} or leave it out")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "ScheduleSpec":
        if self.drops is not None and self.uses_curve():
            raise ValueError(f"give drops or the curve form ({', '.join(CURVE_FIELDS)}), not both")
        return self

    def uses_curve(self) -> bool:
        return any(getattr(self, f) is not None for f in CURVE_FIELDS)

    def resolve(self, num_layers: int, num_vision_tokens: int, saved: Optional[Schedule] = None) -> Schedule:
        """The schedule at this depth and token count. `saved`: the model checkpoint's own schedule, what
        `preset: checkpoint` stands for (ScheduleError when there is none, or it is for another shape)."""
        fields = self.model_dump(exclude_none=True, exclude={"preset", *CURVE_FIELDS})
        if self.preset == CHECKPOINT:
            if saved is None:
                raise ScheduleError(
                    "preset 'checkpoint' needs a model.path whose config.json carries a schedule; this one has none"
                )
            if (saved.num_layers, saved.num_vision_tokens) != (num_layers, num_vision_tokens):
                raise ScheduleError(
                    f"preset 'checkpoint': the saved schedule is for {saved.num_layers} layers / "
                    f"{saved.num_vision_tokens} tokens, the model has {num_layers} / {num_vision_tokens}"
                )
            base_schedule = saved
        elif self.preset:
            base_schedule = preset(self.preset, num_layers, num_vision_tokens)
        else:
            base_schedule = None
        if self.uses_curve():
            base = base_schedule.model_dump() if base_schedule else {}
            base.update(fields)
            for key in ("drops", "num_layers", "num_vision_tokens"):
                base.pop(key, None)
            if self.name is None:  # the preset's drops are gone: its name would mislead
                base["name"] = f"{self.preset}_curve" if self.preset else "pyramid"
            curve = self.model_dump(include=set(CURVE_FIELDS), exclude_none=True)
            return pyramid(num_layers, num_vision_tokens, **base, **curve)
        if base_schedule is not None:
            base = base_schedule.model_dump()
            base.update(fields)
            if self.drops is not None:  # explicit drops replace the preset's
                base["drops"] = [d.model_dump() for d in self.drops]
            return Schedule.model_validate(base)
        if "name" not in fields:
            fields["name"] = "custom"
        return Schedule(num_layers=num_layers, num_vision_tokens=num_vision_tokens, **fields)
