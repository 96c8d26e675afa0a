"""The scheduled decoder loop: late injection, drops, early exit, positions, KV cache, generation.

`ScheduledModel` wraps a stock Hugging Face model (a Llama-family causal LM or a llava-hf LLaVA) and
owns the loop over its decoder layers. Between layers the set of live tokens changes in STAGES: a
stage is a run of layers with the same live tokens, stored as a rectangular (B, W) layout of indices
into the original (padded) sequence. Rows keep their tokens in original order; padding sits on the
same side as in the input (left padding keeps the last prompt token in the last column).

At every stage boundary the hidden states are written back into a buffer in the original layout
(which still holds the raw projector outputs at the vision positions, so injection reads them
unprocessed) and the next stage's live tokens are gathered from it. Each stage gets its own
attention mask and RoPE tables, built once and sized to the stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hidrop.adapter import Backbone, ScheduleCache
from hidrop.cost import paper_layer_macs
from hidrop.schedule import DropEvent, PositionMode, QueryRule, Schedule, Selector
from hidrop.selection import dtopk_soft_mask, straight_through

IGNORE_INDEX = -100


@dataclass
class Stage:
    idx: torch.Tensor  # (B, W) original column of each entry; padding entries point at the dummy column L
    ok: torch.Tensor  # (B, W) real entries
    vision: torch.Tensor  # (B, W) live vision entries
    pos: torch.Tensor  # (B, W) RoPE position ids
    mask: Optional[torch.Tensor]  # attention mask in the form the attention implementation reads
    rope: tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Layout:
    """The prompt before any stage; the `_x` tensors and positions carry a dummy column L for padding."""

    valid: torch.Tensor  # (B, L) real tokens
    vision: torch.Tensor  # (B, L) image tokens among them
    vision_x: torch.Tensor  # (B, L + 1)
    text_x: torch.Tensor  # (B, L + 1)
    base_pos: torch.Tensor  # (B, L + 1) positions in the original layout
    next_pos: torch.Tensor  # (B,) the position the first generated token takes
    pad_left: bool
    full: torch.Tensor  # (B, L + 1, H) the input embeddings
    query_x: Optional[torch.Tensor]  # (B, L + 1) the answer labels whose preceding tokens query, else None


@dataclass
class ScheduledOutput:
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    budget_loss: Optional[torch.Tensor] = None
    past_key_values: Optional[ScheduleCache] = None
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # (B, L) live vision after each drop
    layer_vision_counts: Optional[torch.Tensor] = None  # (num_layers, B) vision tokens entering each layer


class ScheduledModel(nn.Module):
    """A Hugging Face model run under a vision-token `Schedule`."""

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        *,
        image_token_id: Optional[int] = None,
        budget_weight: float = 1.0,
        budget_target: Optional[float] = None,
        budget_kind: str = "tokens",
        budget_anneal: float = 0.0,
        parallel_vision: bool = True,
    ):
        super().__init__()
        # late injection: encode the image while the text-only shallow layers run (a second CUDA stream),
        # and join at the injection layer; on CPU the same deferred injection runs sequentially
        self.parallel_vision = parallel_vision
        self.model = model
        self.backbone = Backbone(model)
        if image_token_id is not None:
            self.backbone.image_token_id = image_token_id
        if schedule.num_layers != self.backbone.num_layers:
            raise ValueError(
                f"schedule {schedule.name!r} is for {schedule.num_layers} layers but the model has "
                f"{self.backbone.num_layers}; use schedule.scaled_to({self.backbone.num_layers})"
            )
        image_seq = getattr(getattr(model, "config", None), "image_seq_length", None)
        if self.backbone.is_llava and image_seq and image_seq != schedule.num_vision_tokens:
            raise ValueError(
                f"schedule {schedule.name!r} expects {schedule.num_vision_tokens} vision tokens per image, "
                f"the model produces {image_seq}"
            )
        if budget_kind not in ("tokens", "flops"):
            raise ValueError(f"budget_kind must be 'tokens' or 'flops', not {budget_kind!r}")
        self.schedule = schedule
        self.budget_weight = budget_weight
        self.budget_target = schedule.avg_tokens() if budget_target is None else budget_target
        self.budget_kind = budget_kind
        # the budget's target anneals from keeping every token to the budget over this fraction of
        # training (0: the budget from the start); the training loop sets how far it is
        if not 0.0 <= budget_anneal <= 1.0:
            raise ValueError(f"budget_anneal must be in [0, 1], not {budget_anneal}")
        self.budget_anneal, self.budget_progress = budget_anneal, 1.0
        self.gradient_checkpointing = False
        # DTop-K with a learnable ratio: one keep fraction (of the original count) per filtering layer.
        n_vis = schedule.num_vision_tokens
        # Stored as a fixed fp32 start times exp(a learned log offset). Mixed-precision trainers (DeepSpeed
        # bf16) flatten every parameter into bf16, which would turn 453/576 into 452 tokens; an offset near 0
        # keeps its relative precision, and the start is a buffer kept in fp32 (see _apply). On a log scale
        # one optimizer step moves every ratio by the same share of itself: in plain fractions a step sized
        # for a 453-token drop moves a 2-token drop past the 1-token floor in one go.
        if schedule.selector == Selector.dtopk_learnable and schedule.drops:
            init = torch.tensor([k / n_vis for k in schedule.keep_counts], dtype=torch.float32)
            self.register_buffer("keep_fraction_init", init)
            self.keep_fraction_log = nn.Parameter(torch.zeros_like(init))
        else:
            self.keep_fraction_init = None
            self.keep_fraction_log = None
        # 0-indexed layer -> drop number, for the two scoring conventions
        self._score_self = {d.scored_by - 1: i for i, d in enumerate(schedule.drops) if d.scored_by == d.after_layer}
        self._score_next = {d.after_layer - 1: i for i, d in enumerate(schedule.drops) if d.scored_by != d.after_layer}
        self._drop_at = {d.after_layer: i for i, d in enumerate(schedule.drops)}  # 0-indexed first layer after

    def _apply(self, fn, *args, **kwargs):
        # module.to(bf16) / .bfloat16() must not round the fp32 start of the learnable keep fractions
        saved = None if self.keep_fraction_init is None else self.keep_fraction_init.clone()
        result = super()._apply(fn, *args, **kwargs)
        if saved is not None:
            self.keep_fraction_init = saved.to(self.keep_fraction_init.device)
        return result

    def learned_schedule(self) -> Schedule:
        """The schedule with the learned keep counts (rounded, still strictly decreasing and >= 1): what a
        trained model exports. The schedule itself when its ratios are fixed."""
        if self.keep_fraction_log is None:
            return self.schedule
        n_vis, drops, previous = self.schedule.num_vision_tokens, [], self.schedule.num_vision_tokens
        fractions = self._clamped_fractions().detach().cpu().tolist()
        for i, (drop, f) in enumerate(zip(self.schedule.drops, fractions)):
            room = len(self.schedule.drops) - i - 1  # later drops still need one token less each
            keep = min(previous - 1, max(1 + room, int(math.floor(f * n_vis + 0.5))))
            drops.append(DropEvent(after_layer=drop.after_layer, keep=keep, score_layer=drop.score_layer))
            previous = keep
        return Schedule.model_validate({**self.schedule.model_dump(), "drops": [d.model_dump() for d in drops]})

    @property
    def keep_fractions(self) -> Optional[torch.Tensor]:
        """Learnable keep fractions (of the original count) per filtering layer, in fp32; None when fixed."""
        if self.keep_fraction_log is None:
            return None
        return self.keep_fraction_init.float() * self.keep_fraction_log.float().exp()

    # ---- public API --------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
        vision_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[ScheduleCache] = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        forced_keep: Optional[list[torch.Tensor]] = None,
        return_logits: bool = True,
    ) -> ScheduledOutput:
        """Prefill / training forward (or one decode step when `past_key_values` is already filled).

        logits_to_keep: 0 = logits in the original (B, L) layout (zeros where a token is not live after
        the last layer); 1 = only the last real token of each row, (B, 1, V).
        forced_keep: per drop, a (B, L) mask of the vision tokens to keep, replacing scoring (used to
        recompute a cached generation without a cache).
        """
        if past_key_values is not None and past_key_values.prefilled:
            embeds = self.backbone.embed(input_ids) if inputs_embeds is None else inputs_embeds
            return self._decode(embeds, past_key_values, logits_to_keep)
        defer = self.parallel_vision and pixel_values is not None and self.schedule.inject_layer > 1
        embeds, vision, deferred = self._embed(
            input_ids, inputs_embeds, pixel_values, vision_embeds, vision_mask, defer
        )
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else ScheduleCache(self.backbone.text_config)
        return self._prefill(
            embeds,
            vision,
            attention_mask,
            labels,
            position_ids,
            cache,
            logits_to_keep,
            forced_keep,
            return_logits,
            deferred,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        pixel_values: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
        vision_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 32,
        eos_token_id: Optional[int | list[int]] = None,
        pad_token_id: Optional[int] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: Optional[torch.Generator] = None,
        return_cache: bool = False,
        forced_keep: Optional[list[torch.Tensor]] = None,
    ):
        """Prefill once with the schedule, then decode with the per-layer cache. Needs left padding.

        Returns the (B, L + new) token ids (and the cache and prefill keep masks if return_cache).
        """
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left padding: the last column must be a real token in every row")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        out = self.forward(
            input_ids,
            attention_mask,
            pixel_values=pixel_values,
            vision_embeds=vision_embeds,
            vision_mask=vision_mask,
            use_cache=True,
            logits_to_keep=1,
            forced_keep=forced_keep,
        )
        cache, keep_masks = out.past_key_values, out.keep_masks
        sequences = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            if eos:
                done = done | torch.isin(token, torch.tensor(sorted(eos), device=token.device))
                if bool(done.all()):
                    break
            if step == max_new_tokens - 1:
                break
            logits = self.forward(token[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1]
        return (sequences, cache, keep_masks) if return_cache else sequences

    def budget_loss(self) -> Optional[torch.Tensor]:
        """The one-sided budget term of the learnable keep ratios (None when they are fixed), as the DTop-K
        reference's resource loss: zero while the cost (average vision tokens per layer, or the paper's
        FLOPs) is within the target, and the overshoot relative to the budget above it. Linear, so its pull
        does not fade near the target: a squared term there is orders of magnitude weaker than the LM
        loss's push for more tokens, and the ratios settle above the budget. The target anneals from
        keeping every token to the budget over the first `budget_anneal` of training (`budget_progress`)."""
        if self.keep_fractions is None:
            return None
        fractions = self._clamped_fractions()
        value = self._budget_cost(fractions)
        keep_all = self._budget_cost(torch.ones_like(fractions))
        goal = self._budget_goal(value)
        ramp = 1.0 if self.budget_anneal == 0 else min(1.0, max(0.0, self.budget_progress) / self.budget_anneal)
        target = keep_all + (goal - keep_all) * ramp
        return self.budget_weight * torch.relu(value - target.detach()) / goal.detach().clamp(min=1e-12)

    def _layer_counts(self, fractions: torch.Tensor) -> torch.Tensor:
        """Vision tokens entering each layer with the drops keeping `fractions` of the original count."""
        s, n_vis = self.schedule, self.schedule.num_vision_tokens
        counts = [torch.tensor(float(n), device=fractions.device) for n in s.tokens_per_layer()]
        for layer in range(s.num_layers):  # replace the fixed drop counts by the soft (learnable) ones
            if counts[layer] > 0:
                for i, drop in enumerate(s.drops):
                    if layer + 1 > drop.after_layer:
                        counts[layer] = fractions[i] * n_vis
        return torch.stack(counts)

    def _budget_cost(self, fractions: torch.Tensor) -> torch.Tensor:
        """The budget's measure of `fractions`: average vision tokens per layer, or the paper's FLOPs."""
        expected = self._layer_counts(fractions)
        if self.budget_kind == "tokens":
            return expected.mean()
        cfg = self.backbone.text_config
        return paper_layer_macs(expected, cfg.hidden_size, cfg.intermediate_size).sum()

    def _budget_goal(self, like: torch.Tensor) -> torch.Tensor:
        """The budget itself in the budget's measure."""
        s = self.schedule
        if self.budget_kind == "tokens":
            return torch.tensor(self.budget_target, device=like.device)
        cfg = self.backbone.text_config
        # the schedule's own per-layer counts, scaled to the target average
        planned = torch.tensor([float(n) for n in s.tokens_per_layer()], device=like.device)
        return paper_layer_macs(
            planned * (self.budget_target / s.avg_tokens()), cfg.hidden_size, cfg.intermediate_size
        ).sum()

    # ---- inputs ------------------------------------------------------------------------------
    def _embed(self, input_ids, inputs_embeds, pixel_values, vision_embeds, vision_mask, defer: bool = False):
        """Token embeddings with the image features in the image positions, and the image mask. With
        `defer`, the features are returned separately (the encoder running on a side stream on CUDA)
        and written in at the injection layer: nothing reads the image rows before it."""
        bb = self.backbone
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            if vision_mask is None and bb.image_token_id is not None:
                vision_mask = input_ids == bb.image_token_id
            embeds = bb.embed(input_ids)
        else:
            embeds = inputs_embeds
        if vision_mask is None:
            vision_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        if pixel_values is not None and defer:
            return embeds, vision_mask, self._start_vision(pixel_values, int(vision_mask.sum()))
        if pixel_values is not None:
            vision_embeds = bb.image_features(pixel_values)
        if vision_embeds is not None:
            vision_embeds = vision_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            if vision_embeds.shape[0] != int(vision_mask.sum()):
                raise ValueError(
                    f"{vision_embeds.shape[0]} vision features for {int(vision_mask.sum())} image positions"
                )
            embeds = embeds.masked_scatter(vision_mask[..., None], vision_embeds)
        elif bool(vision_mask.any()) and inputs_embeds is None:
            raise ValueError("the input has image positions but no pixel_values / vision_embeds")
        return embeds, vision_mask, None

    def _start_vision(self, pixel_values: torch.Tensor, positions: int) -> tuple:
        """Launch the encoder + projector; returns (features, event or None). On CUDA they run on a side
        stream that first waits for the work queued so far (the pixels), so the main stream can go on
        with the text-only layers; `_join_vision` makes the main stream wait for the event."""
        expected = pixel_values.shape[0] * self.schedule.num_vision_tokens
        if expected != positions:
            raise ValueError(f"{expected} vision features for {positions} image positions")
        if not pixel_values.is_cuda:
            return self.backbone.image_features(pixel_values), None
        main = torch.cuda.current_stream(pixel_values.device)
        side = torch.cuda.Stream(pixel_values.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            features = self.backbone.image_features(pixel_values)
            done = torch.cuda.Event()
            done.record(side)
        return features, done

    @staticmethod
    def _join_vision(full: torch.Tensor, vision_x: torch.Tensor, deferred: tuple) -> torch.Tensor:
        features, done = deferred
        if done is not None:
            main = torch.cuda.current_stream(full.device)
            main.wait_event(done)
            features.record_stream(main)  # made on the side stream, used on this one: keep it alive
        features = features.reshape(-1, full.shape[-1]).to(full.dtype)
        if features.shape[0] != int(vision_x.sum()):  # masked_scatter would silently drop extra rows
            raise ValueError(
                f"the encoder returned {features.shape[0]} vision features for {int(vision_x.sum())} image positions"
            )
        return full.masked_scatter(vision_x[..., None], features)

    # ---- prefill -----------------------------------------------------------------------------
    def _prefill(
        self,
        embeds,
        vision,
        attention_mask,
        labels,
        position_ids,
        cache,
        logits_to_keep,
        forced,
        return_logits,
        deferred=None,
    ):
        s = self.schedule
        B, L, H = embeds.shape
        lay = self._layout(embeds, vision, attention_mask, labels, position_ids, logits_to_keep)
        valid, vision, full, query_x = lay.valid, lay.vision, lay.full, lay.query_x
        vision_x, text_x, base_pos, pad_left = lay.vision_x, lay.text_x, lay.base_pos, lay.pad_left
        live_vision = vision_x if s.inject_layer == 1 else torch.zeros_like(vision_x)
        stage = self._make_stage(text_x | live_vision, vision_x, base_pos, pad_left, full)
        hidden = full.gather(1, stage.idx[..., None].expand(-1, -1, H))
        learnable = self.keep_fractions is not None
        fractions = self._clamped_fractions() if learnable else None

        keep_masks, pending, counts = [], None, []
        stage_number = 0
        if cache is not None:
            cache.layer_stage, cache.stage_key_ok, cache.stage_next_pos = [], [stage.ok], []
            cache.stage_next_pos.append(self._next_positions(stage, lay.next_pos))
        for idx in range(s.num_layers):
            change, soft = None, None
            if idx == s.inject_layer - 1 and idx > 0:
                change = text_x | vision_x
            if idx in self._drop_at and pending is not None:
                change, soft = pending
                pending = None
            if s.exit_layer is not None and idx == s.exit_layer - 1:
                change, soft = text_x, None
            if change is not None:
                full = full.scatter(1, stage.idx[..., None].expand(-1, -1, H), hidden)
                if deferred is not None and idx == s.inject_layer - 1:
                    full = self._join_vision(full, vision_x, deferred)
                stage = self._make_stage(change, vision_x, base_pos, pad_left, full)
                hidden = full.gather(1, stage.idx[..., None].expand(-1, -1, H))
                if learnable and soft is not None and torch.is_grad_enabled():
                    factor = soft.gather(1, stage.idx)
                    hidden = straight_through(hidden, factor, stage.vision)
                stage_number += 1
                if cache is not None:
                    cache.stage_key_ok.append(stage.ok)
                    cache.stage_next_pos.append(self._next_positions(stage, lay.next_pos))
            counts.append(stage.vision.sum(1))
            if cache is not None:
                cache.layer_stage.append(stage_number)

            if idx in self._score_self:
                pending = self._select(self._score_self[idx], idx, hidden, stage, query_x, forced, fractions, L + 1)
            hidden = self._run_layer(idx, hidden, stage, cache)
            if idx in self._score_next:
                pending = self._select(self._score_next[idx], idx + 1, hidden, stage, query_x, forced, fractions, L + 1)
            if pending is not None and (idx + 1) in self._drop_at:
                keep_masks.append(pending[0][:, :L] & vision)

        out = ScheduledOutput(logits=None, keep_masks=keep_masks, layer_vision_counts=torch.stack(counts))
        return self._prefill_output(out, hidden, stage, valid, labels, cache, logits_to_keep, return_logits)

    def _layout(self, embeds, vision, attention_mask, labels, position_ids, logits_to_keep) -> "_Layout":
        """The prompt's layout before any stage: valid, vision and text columns, positions (per the
        schedule's position mode), each padded with a dummy column L, and the multi-round query targets."""
        s = self.schedule
        B, L, H = embeds.shape
        dev = embeds.device
        valid = torch.ones(B, L, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        vision = vision & valid
        n_vis = vision.sum(1)
        bad = (n_vis != 0) & (n_vis != s.num_vision_tokens)
        if bool(bad.any()):
            raise ValueError(
                f"every row needs 0 or {s.num_vision_tokens} vision tokens (one image); got {n_vis.tolist()}"
            )
        pad_left = bool(valid[:, -1].all())
        has_image = n_vis > 0
        text = valid & ~vision

        # positions in the original layout (+ a dummy column L for padding entries)
        if position_ids is None:
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0)
        if s.position_mode == PositionMode.group:
            text_rank = (text.long().cumsum(1) - 1).clamp(min=0)
            text_before = text.long().cumsum(1) - text.long()  # text tokens strictly before each column
            start = torch.where(vision, text_before, torch.full_like(text_rank, L)).min(1).values
            start = torch.where(has_image, start, torch.zeros_like(start))
            # vision numbered from the text rank at the image start; text numbered as if no image
            base_pos = torch.where(vision, start[:, None] + (vision.long().cumsum(1) - 1), text_rank)
            next_pos = (text_rank.masked_fill(~text, -1).max(1).values + 1).clamp(min=0)
        else:
            base_pos = position_ids
            next_pos = position_ids.masked_fill(~valid, -1).max(1).values + 1
        base_pos = F.pad(base_pos, (0, 1))
        full = F.pad(embeds, (0, 0, 0, 1))
        vision_x = F.pad(vision, (0, 1))
        text_x = F.pad(text, (0, 1))

        # with labels, queries are the live tokens right before an answer, found in each stage's layout
        # (the token before an answer may itself be pruned, e.g. the last image token in plain format):
        # multi-round takes every answer span, last-prompt only the first, so that training scores with
        # the token the prompt ends with at inference and never with the answer
        query_x = None
        if labels is not None:
            answers = labels.masked_fill(~valid, IGNORE_INDEX)
            if s.query_rule == QueryRule.last_prompt:
                answer = answers != IGNORE_INDEX
                answers = answers.masked_fill(~(answer & (answer.long().cumsum(1) == 1)), IGNORE_INDEX)
            query_x = F.pad(answers, (0, 1), value=IGNORE_INDEX)
        if (
            logits_to_keep == 1
            and not s.is_vanilla()
            and bool((vision & (valid.long().cumsum(1) == valid.sum(1, keepdim=True)) & valid).any())
        ):
            raise ValueError(
                "the prompt ends with an image token; it must end with text for next-token logits under pruning"
            )

        return _Layout(valid, vision, vision_x, text_x, base_pos, next_pos, pad_left, full, query_x)

    def _prefill_output(self, out, hidden, stage, valid, labels, cache, logits_to_keep, return_logits):
        """The final norm, the loss (LM + budget) and the logits asked for, from the last stage's hidden states."""
        bb = self.backbone
        B, L = valid.shape
        H = hidden.shape[-1]
        hidden = bb.norm(hidden)
        if cache is not None:
            cache.logical_length, cache.decoded, cache.prefilled = L, 0, True
            out.past_key_values = cache
        final_logits = None
        if labels is not None or (return_logits and logits_to_keep == 0):
            final_logits = bb.lm_head(hidden)
        if labels is not None:
            lab = F.pad(labels.masked_fill(~valid, IGNORE_INDEX), (0, 1), value=IGNORE_INDEX).gather(1, stage.idx)
            lab = lab.masked_fill(~stage.ok, IGNORE_INDEX)
            target = lab[:, 1:].masked_fill(~stage.ok[:, :-1], IGNORE_INDEX)
            out.loss = F.cross_entropy(
                final_logits[:, :-1].float().reshape(-1, final_logits.shape[-1]),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            if self.keep_fractions is not None:  # learnable keep ratios
                out.budget_loss = self.budget_loss()
                out.loss = out.loss + out.budget_loss
        if return_logits:
            if logits_to_keep == 1:
                last = self._last_entry(stage)
                out.logits = bb.lm_head(hidden.gather(1, last[:, None, None].expand(-1, 1, H)))
            elif logits_to_keep == 0:
                V = final_logits.shape[-1]
                buf = final_logits.new_zeros(B, L + 1, V)
                out.logits = buf.scatter(1, stage.idx[..., None].expand(-1, -1, V), final_logits)[:, :L]
            else:
                raise ValueError("logits_to_keep must be 0 (all positions) or 1 (last token)")
        return out

    def _make_stage(self, live, vision_x, base_pos, pad_left, like) -> Stage:
        """Rectangular layout of the live columns (B, L+1 bool; the dummy column L is never live)."""
        B, Lx = live.shape
        live = live.clone()
        live[:, -1] = False
        counts = live.sum(1)
        W = max(int(counts.max()), 1)
        ar = torch.arange(W, device=live.device)
        if pad_left:  # live columns last, in original order
            order = torch.sort(live.to(torch.int8), dim=1, stable=True).indices[:, Lx - W :]
            ok = ar[None] >= (W - counts)[:, None]
        else:  # live columns first
            order = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices[:, :W]
            ok = ar[None] < counts[:, None]
        idx = torch.where(ok, order, torch.full_like(order, Lx - 1))
        vis = vision_x.gather(1, idx) & ok
        if self.schedule.position_mode == PositionMode.compacted:
            pos = (ok.long().cumsum(1) - 1).clamp(min=0)
        else:
            pos = base_pos.gather(1, idx)
        rope = self.backbone.rotary(like, pos)
        return Stage(idx=idx, ok=ok, vision=vis, pos=pos, mask=self._stage_mask(ok, like.dtype), rope=rope)

    def _stage_mask(self, ok: torch.Tensor, dtype) -> Optional[torch.Tensor]:
        bb = self.backbone
        if bb.uses_flash:
            return None if bool(ok.all()) else ok.long()  # 2D padding mask: no packed-sequence guessing
        if bb.attn_implementation == "sdpa" and bool(ok.all()):
            return None  # plain causal: SDPA takes its fastest path
        W = ok.shape[1]
        causal = torch.ones(W, W, dtype=torch.bool, device=ok.device).tril()
        eye = torch.eye(W, dtype=torch.bool, device=ok.device)
        # padding query rows attend to themselves only, so no row is fully masked (no NaN)
        allowed = (causal[None] & ok[:, None, :]) | eye[None]
        return bb.attention_mask(allowed[:, None], dtype)

    def _next_positions(self, stage: Stage, next_pos: torch.Tensor) -> torch.Tensor:
        if self.schedule.position_mode == PositionMode.compacted:
            return stage.ok.sum(1)
        return next_pos

    @staticmethod
    def _last_entry(stage: Stage) -> torch.Tensor:
        W = stage.ok.shape[1]
        ar = torch.arange(W, device=stage.ok.device)
        return torch.where(stage.ok, ar[None], torch.full_like(ar[None], -1)).max(1).values

    def _run_layer(self, idx, hidden, stage: Stage, cache):
        bb = self.backbone
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(bb.run_layer, idx, hidden, stage.mask, stage.pos, stage.rope, cache, use_reentrant=False)
        return bb.run_layer(idx, hidden, stage.mask, stage.pos, stage.rope, cache)

    def _clamped_fractions(self) -> torch.Tensor:
        """The keep fractions within [1 token, every token], with a straight-through gradient: a ratio held
        at the floor (or ceiling) still hears the loss and can come back, where a plain clamp would leave
        it there for good."""
        n, fractions = self.schedule.num_vision_tokens, self.keep_fractions
        return fractions + (fractions.clamp(1.0 / n, 1.0) - fractions).detach()

    # ---- selection ---------------------------------------------------------------------------
    def _select(self, drop_number, score_idx, hidden, stage: Stage, query_x, forced, fractions, Lx):
        """Decide which vision tokens survive drop `drop_number`.

        Returns (live mask over the original columns (B, L+1), soft DTop-K mask over the original
        columns or None).
        """
        s = self.schedule
        drop = s.drops[drop_number]
        B, W, _ = hidden.shape
        text_live = torch.zeros(B, Lx, dtype=torch.bool, device=hidden.device)
        text_live.scatter_(1, stage.idx, stage.ok & ~stage.vision)
        text_live[:, -1] = False
        if forced is not None:
            keep = F.pad(forced[drop_number].bool(), (0, Lx - forced[drop_number].shape[1]))
            return text_live | keep, None

        # query rows in this stage's layout
        last = self._last_entry(stage)
        if query_x is not None:
            lab = query_x.gather(1, stage.idx).masked_fill(~stage.ok, IGNORE_INDEX)
            qmask = torch.zeros_like(stage.ok)
            qmask[:, :-1] = (lab[:, :-1] == IGNORE_INDEX) & (lab[:, 1:] != IGNORE_INDEX) & stage.ok[:, :-1]
            if s.query_rule == QueryRule.last_prompt:  # a row without an answer: its last token, as at inference
                no_answer = ~qmask.any(1, keepdim=True)
                qmask = qmask | (no_answer & (torch.arange(W, device=hidden.device)[None] == last[:, None]))
        else:
            qmask = torch.zeros_like(stage.ok)
            qmask.scatter_(1, last[:, None], True)
        q_count = qmask.sum(1)
        Q = max(int(q_count.max()), 1)
        q_order = torch.sort((~qmask).to(torch.int8), dim=1, stable=True).indices[:, :Q]
        q_ok = torch.arange(Q, device=hidden.device)[None] < q_count[:, None]
        fallback = last[:, None].expand(-1, Q)
        q_idx = torch.where(q_ok, q_order, fallback)

        with torch.no_grad():  # scores never receive gradient (DTop-K ranks are piecewise constant)
            scores = self._attention_scores(score_idx, hidden, stage, q_idx, q_ok)

        n_live = stage.vision.sum(1)
        keep_k = drop.keep_count(s.num_vision_tokens)
        if fractions is not None:
            keep_k = int(torch.round(fractions[drop_number].detach() * s.num_vision_tokens).clamp(min=1).item())
        prunable = (n_live > 0) & (q_count > 0)
        k = min(keep_k, int(n_live.max()) if bool(prunable.any()) else 0)
        vision_live = torch.zeros(B, Lx, dtype=torch.bool, device=hidden.device)
        vision_live.scatter_(1, stage.idx, stage.vision)
        soft_x = None
        if k > 0:
            masked = scores.masked_fill(~stage.vision, float("-inf"))
            top = masked.topk(k, dim=1).indices
            chosen = torch.zeros(B, Lx, dtype=torch.bool, device=hidden.device)
            chosen.scatter_(1, stage.idx.gather(1, top), True)
            chosen &= vision_live  # rows with fewer live vision tokens than k pick -inf entries: ignore them
            vision_live = torch.where(prunable[:, None], chosen, vision_live)
            if fractions is not None:
                soft = dtopk_soft_mask(masked, stage.vision, fractions[drop_number], s.num_vision_tokens)
                soft_x = torch.zeros(B, Lx, dtype=soft.dtype, device=hidden.device).scatter(1, stage.idx, soft)
                soft_x = soft_x.masked_fill(~vision_live, 0.0)
        return text_live | vision_live, soft_x

    def _attention_scores(self, idx, hidden, stage: Stage, q_idx, q_ok) -> torch.Tensor:
        """Head- and query-averaged attention (softmax over ALL keys, fp32) from the query rows: (B, W)."""
        bb = self.backbone
        H = hidden.shape[-1]
        q_hidden = hidden.gather(1, q_idx[..., None].expand(-1, -1, H))
        q_pos = stage.pos.gather(1, q_idx)
        q_rope = bb.rotary(hidden, q_pos)
        q, k, scale = bb.query_key(idx, q_hidden, hidden, q_rope, stage.rope)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, Q, W)
        W = hidden.shape[1]
        allowed = stage.ok[:, None, :] & (torch.arange(W, device=hidden.device)[None, None, :] <= q_idx[..., None])
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = logits.softmax(-1).mean(1)  # (B, Q, W)
        weights = q_ok.float()
        return (probs * weights[..., None]).sum(1) / weights.sum(1).clamp(min=1.0)[:, None]

    # ---- decode ------------------------------------------------------------------------------
    def _decode(self, embeds, cache: ScheduleCache, logits_to_keep):
        bb = self.backbone
        B, q, _ = embeds.shape
        dev = embeds.device
        stage_inputs = []
        ar = torch.arange(q, device=dev)
        for key_ok, next_pos in zip(cache.stage_key_ok, cache.stage_next_pos):
            pos = next_pos[:, None] + cache.decoded + ar[None]
            prior = torch.cat([key_ok, torch.ones(B, cache.decoded, dtype=torch.bool, device=dev)], dim=1)
            allowed = torch.cat(
                [
                    prior[:, None, :].expand(B, q, -1),
                    torch.ones(q, q, dtype=torch.bool, device=dev).tril()[None].expand(B, -1, -1),
                ],
                dim=2,
            )
            if bb.uses_flash:
                mask = (
                    None
                    if bool(allowed.all())
                    else torch.cat([prior, torch.ones(B, q, dtype=torch.bool, device=dev)], 1).long()
                )
            else:
                mask = bb.attention_mask(allowed[:, None], embeds.dtype)
            stage_inputs.append((pos, mask, bb.rotary(embeds, pos)))
        hidden = embeds
        for idx in range(bb.num_layers):
            pos, mask, rope = stage_inputs[cache.layer_stage[idx]]
            hidden = bb.run_layer(idx, hidden, mask, pos, rope, cache)
        cache.decoded += q
        cache.logical_length += q
        hidden = bb.norm(hidden)
        if logits_to_keep == 1:
            hidden = hidden[:, -1:]
        return ScheduledOutput(logits=bb.lm_head(hidden), past_key_values=cache)


def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
