"""An independent brute-force reference for scheduled forwards.

One sample at a time, no padding, no gathering: every layer runs over ALL columns of the sample and
an explicit per-layer mask hides the tokens that are not alive. RoPE and the scoring attention are
recomputed here from first principles (own inverse frequencies, own per-head loop), so the engine's
layouts, masks, positions and scoring are checked against something that shares none of that code.
Only the stock decoder layers, norms and heads of the model are shared.
"""

from __future__ import annotations

import torch

from hidrop.schedule import PositionMode, QueryRule, Schedule


def _rope(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = positions.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _positions(schedule: Schedule, alive: list[bool], vision: list[bool]) -> torch.Tensor:
    T = len(alive)
    if schedule.position_mode == PositionMode.persistent:
        return torch.arange(T)
    if schedule.position_mode == PositionMode.compacted:
        pos, rank = [], 0
        for a in alive:
            pos.append(rank)
            rank += int(a)
        return torch.tensor(pos)
    # group: text numbered as if the image were absent, vision from the text rank at the image start
    pos, text_rank, vis_rank, start = [], 0, 0, None
    for v in vision:
        if v:
            if start is None:
                start = text_rank
            pos.append(start + vis_rank)
            vis_rank += 1
        else:
            pos.append(text_rank)
            text_rank += 1
    return torch.tensor(pos)


def _scores(layer, h, alive, queries, positions, cfg) -> torch.Tensor:
    """Per-head loop: softmax over all alive keys up to the query, averaged over heads and queries."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    x = layer.input_layernorm(h)
    q = layer.self_attn.q_proj(x).view(len(alive), heads, d)
    k = layer.self_attn.k_proj(x).view(len(alive), kv_heads, d)
    cos, sin = _rope(positions, d, cfg.rope_parameters["rope_theta"], h.dtype)
    total = torch.zeros(len(alive), dtype=torch.float64)
    for qi in queries:
        for head in range(heads):
            qh = _rotate(q[qi, head], cos[qi], sin[qi])
            keys = [j for j in range(qi + 1) if alive[j]]
            kh = torch.stack([_rotate(k[j, head // (heads // kv_heads)], cos[j], sin[j]) for j in keys])
            p = torch.softmax((kh.double() @ qh.double()) / d**0.5, dim=0)
            for j, pj in zip(keys, p):
                total[j] += pj / (heads * len(queries))
    return total


@torch.no_grad()
def reference_forward(sm, embeds, vision, labels=None, forced=None):
    """Logits (T, V) of one unpadded sample, the alive set after the last layer, and the keep sets.

    sm: a ScheduledModel (only its stock modules and schedule are used); embeds (T, H); vision (T,) bool.
    """
    s: Schedule = sm.schedule
    bb = sm.backbone
    cfg = bb.text_config
    T = embeds.shape[0]
    vision = [bool(v) for v in vision]
    has_image = any(vision)
    alive = [not v or s.inject_layer == 1 for v in vision]
    h = embeds.clone()

    def queries():
        if labels is not None:
            cols = [j for j in range(T) if alive[j]]
            before = [a for a, b in zip(cols[:-1], cols[1:]) if labels[a] == -100 and labels[b] != -100]
            if s.query_rule == QueryRule.multi_round:
                return before
            first = next((j for j in range(T) if labels[j] != -100), None)  # last_prompt: the first answer's
            return [max(j for j in cols if j < first)] if first is not None and first > cols[0] else [T - 1]
        return [T - 1]

    keeps, pending = [], None
    for layer_number in range(1, s.num_layers + 1):
        if layer_number == s.inject_layer and layer_number > 1:
            for j in range(T):
                if vision[j]:
                    alive[j] = True
                    h[j] = embeds[j]  # raw projector output, untouched by earlier layers
        for i, drop in enumerate(s.drops):
            if layer_number == drop.after_layer + 1 and pending is not None:
                alive = [a and (not vision[j] or j in pending) for j, a in enumerate(alive)]
                pending = None
        if s.exit_layer is not None and layer_number == s.exit_layer:
            alive = [a and not vision[j] for j, a in enumerate(alive)]
        positions = _positions(s, alive, vision)

        def select(score_layer_number, drop_index):
            drop = s.drops[drop_index]
            if forced is not None:
                chosen = {j for j in range(T) if bool(forced[drop_index][j])}
            elif not has_image or not queries():
                chosen = {j for j in range(T) if vision[j] and alive[j]}
            else:
                sc = _scores(bb.layers[score_layer_number - 1], h, alive, queries(), positions, cfg)
                cand = [j for j in range(T) if vision[j] and alive[j]]
                k = min(drop.keep_count(s.num_vision_tokens), len(cand))
                chosen = set(sorted(cand, key=lambda j: -float(sc[j]))[:k])
            keeps.append(chosen)
            return chosen

        for i, drop in enumerate(s.drops):
            if drop.scored_by == drop.after_layer == layer_number:
                pending = select(layer_number, i)
        allowed = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            for j in range(i + 1):
                allowed[i, j] = alive[j]
            allowed[i, i] = True
        mask = torch.zeros(1, 1, T, T, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        d = cfg.hidden_size // cfg.num_attention_heads
        cos, sin = _rope(positions, d, cfg.rope_parameters["rope_theta"], h.dtype)
        out = bb.layers[layer_number - 1](
            h[None], attention_mask=mask, position_ids=positions[None], position_embeddings=(cos[None], sin[None])
        )
        h = (out[0] if isinstance(out, tuple) else out)[0]
        for i, drop in enumerate(s.drops):
            if drop.after_layer == layer_number and drop.scored_by == layer_number + 1:
                pending = select(layer_number + 1, i)
    logits = bb.lm_head(bb.norm(h))
    loss = None
    if labels is not None:
        cols = [j for j in range(T) if alive[j]]
        nll, n = 0.0, 0
        for a, b in zip(cols[:-1], cols[1:]):
            if labels[b] != -100:
                nll += -torch.log_softmax(logits[a].double(), -1)[labels[b]]
                n += 1
        loss = nll / max(n, 1)
    return logits, alive, keeps, loss
