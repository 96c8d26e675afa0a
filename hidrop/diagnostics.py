"""Layer diagnostics (method.md section 6) and the schedule they propose, for any supported model.

All curves are indexed by layer, 1-indexed as in the paper (`curve[l - 1]` is layer l), computed on a
calibration set with the model unpruned:

- S_intra(l): mean cosine between each vision token's hidden state entering layer l and leaving it. A
  dip marks the layer where the vision tokens start to be rewritten.
- S_cross(l): 1 - mean cosine between the instruction tokens' states leaving layer l with the sample's
  image and with a reference image (uniform grey by default). Near 0 while no image information has
  reached the text.
- ILVAS(l, l+n, K): take the K vision tokens the last prompt token attends to most at layer l (head
  mean); for each head, the cosine between its attention over those K tokens at layer l and at l+n;
  averaged over heads and samples. High where the choice of important tokens persists, i.e. where
  filtering loses little (method.md's "head-wise attention vectors": one K-vector per head).
- Sweeps: the benchmark score when every vision token leaves before layer l (exit sweep) and when they
  arrive at layer l (injection sweep), evaluated through the engine.

Attention comes from the same single-query scoring pass the engine prunes with (the layer's own
input_layernorm, q_proj and k_proj on its input, softmax in fp32 over all keys), never from
`output_attentions`, so the model keeps its SDPA / FlashAttention kernels, and the layer loop keeps only
the statistics, not every hidden state, so memory stays at one forward's worth.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image

from hidrop.adapter import Backbone
from hidrop.data import Collator, encode_sample, get_template
from hidrop.models import VisionLanguageModel
from hidrop.sample import Sample
from hidrop.schedule import Schedule, ScheduleError, pyramid, spread_layers

# ---- curve helpers (pure) ----------------------------------------------------------------------


def local_extrema(
    values: Sequence[float], lo: int, hi: int, kind: str = "max", min_prominence: float = 1e-4
) -> list[int]:
    """1-indexed layers l in lo..hi where values[l-1] is a strict local maximum (or minimum): above the
    neighbouring values on each side by more than `min_prominence` (a flat top counts once, at its first
    layer). Window edges count when the curve falls away from them inside the window. Ordered by
    prominence (the smaller of the two drops), largest first."""
    sign = 1.0 if kind == "max" else -1.0
    v = [sign * float(x) for x in values]
    lo, hi = max(1, lo), min(len(v), hi)
    found: list[tuple[float, int]] = []
    l = lo
    while l <= hi:
        end = l
        while end + 1 <= hi and v[end] == v[l - 1]:  # a plateau l..end
            end += 1
        left = v[l - 2] if l - 1 >= lo else None
        right = v[end] if end + 1 <= hi else None
        neighbours = [x for x in (left, right) if x is not None]
        if neighbours and all(v[l - 1] - x > min_prominence for x in neighbours):
            found.append((v[l - 1] - max(neighbours), l))
        l = end + 1
    return [layer for _, layer in sorted(found, key=lambda t: (-t[0], t[1]))]


def plateau_start(scores: Sequence[float], final: float, tolerance: float) -> int:
    """Index i (0-based) from which every score stays within `tolerance` below `final`."""
    start = len(scores)
    for i in range(len(scores) - 1, -1, -1):
        if scores[i] >= final - tolerance:
            start = i
        else:
            break
    return start


def onset(values: Sequence[float], fraction: float) -> int:
    """First 1-indexed layer whose value reaches `fraction` of the curve's maximum (len + 1 if none)."""
    top = max(values) if values else 0.0
    for l, x in enumerate(values, start=1):
        if top > 0 and x >= fraction * top:
            return l
    return len(values) + 1


# ---- the layer loop ----------------------------------------------------------------------------


def reference_image(sample_image: Image.Image) -> Image.Image:
    """The default reference: a uniform mid-grey image of the same size."""
    return Image.new("RGB", sample_image.size, (128, 128, 128))


@torch.no_grad()
def layer_curves(
    vlm: VisionLanguageModel,
    samples: Sequence[Sample],
    *,
    ilvas_k: Sequence[int] = (5, 20, 50),
    ilvas_n: Sequence[int] = (4, 8),
    reference: str = "gray",
    batch_size: int = 8,
) -> dict:
    """S_intra, S_cross and ILVAS curves over `samples` (each must carry an image)."""
    samples = [s for s in samples if s.has_image]
    if not samples:
        raise ValueError("the calibration set has no sample with an image")
    L, n_vis = vlm.num_layers, vlm.num_vision_tokens
    ks = sorted({min(int(k), n_vis) for k in ilvas_k if int(k) > 0})
    ns = sorted({int(n) for n in ilvas_n if 0 < int(n) < L})
    sums = {"intra": torch.zeros(L, dtype=torch.float64), "cross": torch.zeros(L, dtype=torch.float64)}
    ilvas_sum = {(k, n): torch.zeros(L - n, dtype=torch.float64) for k in ks for n in ns}
    count = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ref_images = _reference_images(chunk, reference, samples)
        intra, cross, attention = _batch_stats(vlm, chunk, ref_images)
        sums["intra"] += intra.sum(0)
        sums["cross"] += cross.sum(0)
        for (k, n), acc in ilvas_sum.items():
            acc += _ilvas(attention, k, n).sum(0)
        count += len(chunk)
    ilvas = {f"K{k}_n{n}": (acc / count).tolist() for (k, n), acc in ilvas_sum.items()}
    return {
        "num_layers": L,
        "num_vision_tokens": n_vis,
        "samples": count,
        "reference": reference,
        "s_intra": (sums["intra"] / count).tolist(),
        "s_cross": (sums["cross"] / count).tolist(),
        "ilvas": ilvas,
        "ilvas_k": ks,
        "ilvas_n": ns,
        "ilvas_mean": _mean_ilvas(ilvas_sum, count, L),
    }


def _reference_images(chunk, reference: str, all_samples) -> list[Image.Image]:
    if reference == "gray":
        return [reference_image(s.load_image()) for s in chunk]
    if reference == "shuffled":  # the next calibration sample's image (a real but unrelated picture)
        index = {id(s): i for i, s in enumerate(all_samples)}
        return [all_samples[(index[id(s)] + 1) % len(all_samples)].load_image() for s in chunk]
    raise ValueError(f"reference must be 'gray' or 'shuffled', not {reference!r}")


def _mean_ilvas(ilvas_sum: dict, count: int, L: int) -> list[Optional[float]]:
    """ILVAS averaged over every (K, n) defined at layer l (the paper found the maxima stable across them)."""
    out: list[Optional[float]] = []
    for i in range(L):
        vals = [float(acc[i]) / count for (_, n), acc in ilvas_sum.items() if i < L - n]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _batch_stats(vlm: VisionLanguageModel, chunk: Sequence[Sample], ref_images: list[Image.Image]):
    """Per sample: S_intra (B, L), S_cross (B, L) and head-wise attention to the vision tokens (B, L, H, N)."""
    device = vlm.device
    tok = vlm.tokenizer
    template = get_template(vlm.template)
    kw = dict(image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_vision_tokens, for_generation=True)
    batch = Collator.for_tokenizer(tok, padding_side="left")([encode_sample(s, tok, template, **kw) for s in chunk])
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    B, T = ids.shape
    vision = ids == vlm.image_token_id
    pixels = torch.stack(
        [vlm.image_processor(s.load_image()) for s in chunk] + [vlm.image_processor(im) for im in ref_images]
    ).to(device)
    embeds_all = vlm.vision_embeds(pixels)  # (2B, N, D): own images, then the reference images
    bb = Backbone(vlm.lm)
    text = bb.embed(ids)
    dtype = text.dtype
    hidden = torch.cat([text, text], 0).clone()
    both_vision = torch.cat([vision, vision], 0)
    hidden[both_vision] = embeds_all.reshape(-1, embeds_all.shape[-1]).to(dtype)
    mask2 = torch.cat([am, am], 0).bool()
    pos = (mask2.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & mask2[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=device)[None]  # padded rows see themselves: no NaN
    attn_mask = bb.attention_mask(allowed[:, None], dtype)
    rope = bb.rotary(hidden, pos)
    # the instruction: real text tokens after the image; the query: the last prompt token (left padding)
    after_image = vision.long().cumsum(1) >= vlm.num_vision_tokens
    instruction = am.bool() & ~vision & after_image
    last = T - 1
    L = vlm.num_layers
    intra = torch.zeros(B, L, dtype=torch.float64, device=device)
    cross = torch.zeros(B, L, dtype=torch.float64, device=device)
    attention = []
    for idx in range(L):
        attention.append(_vision_attention(bb, idx, hidden[:B], pos[:B], rope, mask2[:B], vision, last))
        new = bb.run_layer(idx, hidden, attn_mask, pos, rope, None)
        cos = torch.nn.functional.cosine_similarity(hidden[:B].float(), new[:B].float(), dim=-1)  # (B, T)
        intra[:, idx] = _masked_mean(cos, vision)
        cos_x = torch.nn.functional.cosine_similarity(new[:B].float(), new[B:].float(), dim=-1)
        cross[:, idx] = 1.0 - _masked_mean(cos_x, instruction)
        hidden = new
    return intra.cpu(), cross.cpu(), torch.stack(attention, 1).cpu()  # (B, L, H, N)


def _vision_attention(bb: Backbone, idx, hidden, pos, rope, valid, vision, last: int) -> torch.Tensor:
    """Head-wise attention (B, H, N) of the last prompt token to the vision tokens at layer idx: the
    engine's scoring pass (this layer's q/k on its input, fp32 softmax over every key)."""
    B, T, D = hidden.shape
    q_hidden = hidden[:, last : last + 1]
    q_rope = tuple(r[:B, last : last + 1] for r in rope)
    k_rope = tuple(r[:B] for r in rope)
    q, k, scale = bb.query_key(idx, q_hidden, hidden, q_rope, k_rope)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, 1, T)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)[:, :, 0]  # (B, H, T)
    n = int(vision[0].sum())
    return probs[vision[:, None, :].expand_as(probs)].view(B, probs.shape[1], n)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum(1).double() / m.sum(1).clamp(min=1).double()


def _ilvas(attention: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """(B, L - n): for each layer l, take the k vision tokens with the most head-mean attention at l; per
    head, compare its attention over those k tokens at layer l and at l + n (cosine); average the heads."""
    B, L, H, N = attention.shape
    out = torch.zeros(B, L - n, dtype=torch.float64)
    for l in range(L - n):
        top = attention[:, l].mean(1).topk(k, dim=-1).indices  # (B, k)
        a = attention[:, l].gather(2, top[:, None, :].expand(B, H, k))  # (B, H, k)
        b = attention[:, l + n].gather(2, top[:, None, :].expand(B, H, k))
        out[:, l] = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=2).mean(1)
    return out


# ---- sweeps ------------------------------------------------------------------------------------


def sweep_schedules(num_layers: int, num_vision_tokens: int, stride: int = 1) -> tuple[list[Schedule], list[Schedule]]:
    """Exit at l (vision leaves before layer l, l = 2..L) and injection at l (vision arrives at l, l = 2..L)."""
    layers = list(range(2, num_layers + 1, stride))
    if layers[-1] != num_layers:
        layers.append(num_layers)
    exits = [
        Schedule(num_layers=num_layers, num_vision_tokens=num_vision_tokens, exit_layer=l, name=f"exit_L{l}")
        for l in layers
    ]
    injects = [
        Schedule(num_layers=num_layers, num_vision_tokens=num_vision_tokens, inject_layer=l, name=f"inject_L{l}")
        for l in layers
    ]
    return exits, injects


def run_sweeps(
    vlm: VisionLanguageModel,
    benchmarks,
    *,
    stride: int = 1,
    mode: str = "auto",
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> dict:
    """Scores of the exit and injection sweeps (one harness pass: the vision tower runs once per batch)."""
    from hidrop.evaluation.harness import evaluate
    from hidrop.evaluation.metrics import mean

    exits, injects = sweep_schedules(vlm.num_layers, vlm.num_vision_tokens, stride)
    report = evaluate(
        vlm,
        exits + injects,
        benchmarks,
        baselines=["blind"],
        mode=mode,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        n_resamples=0,  # point estimates: the sweep curves carry no intervals yet
    )
    score = {r.method: mean(r.scores().values()) for r in report.methods}
    return {
        "layers": [s.exit_layer for s in exits],
        "exit": [score[s.name] for s in exits],
        "inject": [score[s.name] for s in injects],
        "all_tokens": score["all_tokens"],
        "blind": score["blind"],
        "samples": report.samples_evaluated,
        "notes": report.notes,
    }


# ---- the proposal ------------------------------------------------------------------------------


def propose(
    curves: dict,
    sweeps: Optional[dict],
    *,
    avg_tokens: float,
    stages: int = 4,
    keep_decay: float = 0.5,
    exit_tolerance: float = 2.0,
    onset_fraction: float = 0.1,
) -> dict:
    """A schedule (curve form fields) from the diagnostics, and the reason for every choice."""
    L, n_vis = curves["num_layers"], curves["num_vision_tokens"]
    why: dict[str, str] = {}
    inject = _propose_inject(curves, sweeps, exit_tolerance, onset_fraction, why)
    exit_layer = _propose_exit(sweeps, exit_tolerance, why)
    end = L + 1 if exit_layer is None else exit_layer
    if end - inject < 3:  # room for at least one drop: a layer before it and one after it
        end = min(L + 1, inject + 3)
        inject = min(inject, end - 3)
        exit_layer = None if end > L else end
        why["exit_layer"] += (
            f"; the plateau starts before there is room for a drop (the image barely matters to "
            f"this model on this data), so the window is widened to L{inject}..L{end - 1}"
        )
    chosen = _propose_drops(curves, inject, end, stages, why)
    spec = {
        "inject_layer": inject,
        "exit_layer": exit_layer,
        "drop_layers": chosen,
        "keep_decay": keep_decay,
        "avg_tokens": avg_tokens,
        "name": "proposed",
    }
    schedule = _propose_keeps(L, n_vis, spec, why)
    return {
        "schedule_fields": {k: v for k, v in spec.items() if v is not None},
        "schedule": schedule.model_dump(mode="json"),
        "plan": schedule.describe(),
        "avg_tokens": schedule.avg_tokens(),
        "why": why,
    }


def _propose_inject(curves: dict, sweeps: Optional[dict], tolerance: float, onset_fraction: float, why) -> int:
    """The deepest S_intra dip in the first half, no later than the S_cross onset (or the injection
    sweep's last passive layer, when it is earlier)."""
    L = curves["num_layers"]
    half = max(2, L // 2 + 1)
    dips = local_extrema(curves["s_intra"], 2, half, kind="min")
    intra_layer = min(dips[:1] or [min(range(2, half + 1), key=lambda l: curves["s_intra"][l - 1])])
    cross_onset = onset(curves["s_cross"], onset_fraction)
    inject = max(1, min(intra_layer, cross_onset))
    why["inject_layer"] = (
        f"S_intra's deepest dip in layers 2..{half} is at L{intra_layer}; S_cross reaches "
        f"{onset_fraction:.0%} of its maximum at L{cross_onset}; the earlier of the two"
    )
    if sweeps is not None:  # the injection sweep measures directly what the two curves suggest
        passive = passive_shallow_layers(sweeps, tolerance)
        if passive < inject:
            inject = passive
            why["inject_layer"] += (
                f"; but the injection sweep loses more than {tolerance:g} points when the image "
                f"arrives after L{passive}, so L{passive}"
            )
    return inject


def _propose_exit(sweeps: Optional[dict], tolerance: float, why) -> Optional[int]:
    """Where the exit sweep reaches its plateau; None (vision to the end) without one."""
    if sweeps is None:
        why["exit_layer"] = "no exit sweep was run: vision stays to the end"
        return None
    i = plateau_start(sweeps["exit"], sweeps["all_tokens"], tolerance)
    if i >= len(sweeps["layers"]):
        why["exit_layer"] = "no exit layer keeps the score within tolerance: vision stays to the end"
        return None
    exit_layer = sweeps["layers"][i]
    why["exit_layer"] = (
        f"removing every vision token before L{exit_layer} or later keeps the score within "
        f"{tolerance:g} points of all tokens ({sweeps['all_tokens']:.1f})"
    )
    return exit_layer


def _propose_drops(curves: dict, inject: int, end: int, stages: int, why) -> list[int]:
    """Filtering layers: the most prominent ILVAS maxima inside the window, else spread evenly."""
    lo, hi = inject, end - 2
    maxima = [l for l in local_extrema([x if x is not None else -1.0 for x in curves["ilvas_mean"]], lo, hi, "max")]
    chosen = sorted(maxima[:stages])
    if chosen:
        why["drop_layers"] = f"ILVAS local maxima in L{lo}..L{hi}, the {len(chosen)} most prominent: {chosen}"
        return chosen
    chosen = spread_layers(inject, end, max(1, min(stages, hi - lo + 1)))
    why["drop_layers"] = f"ILVAS has no local maximum in L{lo}..L{hi}: {len(chosen)} layers spread over the window"
    return chosen


def _propose_keeps(L: int, n_vis: int, spec: dict, why) -> Schedule:
    """The keep curve solved for the budget; outside what the window allows, the nearest reachable average
    (`spec["avg_tokens"]` is updated)."""
    avg_tokens, keep_decay = spec["avg_tokens"], spec["keep_decay"]
    fields = {k: v for k, v in spec.items() if k != "name"}
    try:
        schedule = pyramid(L, n_vis, **fields, name="proposed")
        why["keeps"] = (
            f"first keep solved for {avg_tokens:g} tokens per layer on average, then x{keep_decay:g} per stage"
        )
        return schedule
    except ScheduleError as e:
        reachable = [
            pyramid(
                L,
                n_vis,
                inject_layer=spec["inject_layer"],
                exit_layer=spec["exit_layer"],
                drop_layers=spec["drop_layers"],
                keep_decay=keep_decay,
                first_keep_ratio=f / n_vis,
            )
            for f in (len(spec["drop_layers"]), n_vis - 1)
        ]
        nearest = min((r.avg_tokens() for r in reachable), key=lambda a: abs(a - avg_tokens))
        spec["avg_tokens"] = nearest
        why["keeps"] = f"{e}; using the nearest reachable average, {nearest:.1f}"
        return pyramid(L, n_vis, **{**fields, "avg_tokens": nearest}, name="proposed")


def passive_shallow_layers(sweeps: dict, tolerance: float) -> int:
    """The deepest injection layer whose score stays within `tolerance` of all tokens (1 = none passive)."""
    deepest = 1
    for layer, score in zip(sweeps["layers"], sweeps["inject"]):
        if score >= sweeps["all_tokens"] - tolerance:
            deepest = layer
        else:
            break
    return deepest


def default_budget(num_vision_tokens: int) -> float:
    """HiDrop Tok64's share of LLaVA-1.5's 576 tokens, at this model's token count."""
    return round(num_vision_tokens * 64 / 576, 2)
