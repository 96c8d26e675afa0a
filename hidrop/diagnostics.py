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

Every number carries its uncertainty: the curves their standard error over the calibration samples
(`*_se`), the sweep scores a paired bootstrap interval of their difference to all tokens on the same
questions. The proposal decides on those intervals, not on point estimates: a sweep point is "within
tolerance" when its difference's interval reaches above -tolerance, it "loses more" when the whole
interval lies below, and a reason says "inconclusive" when the interval straddles the threshold, with
the number of questions that would resolve it at the observed spread. An ILVAS local maximum counts only
when it stands above both neighbours by more than 1.96 standard errors of the paired per-sample
differences.

Attention comes from the same single-query scoring pass the engine prunes with (the layer's own
input_layernorm, q_proj and k_proj on its input, softmax in fp32 over all keys), never from
`output_attentions`, so the model keeps its SDPA / FlashAttention kernels, and the layer loop keeps only
the statistics, not every hidden state, so memory stays at one forward's worth.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
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


Z95 = 1.96  # two-sided 95%


def standard_error(per_sample: np.ndarray) -> np.ndarray:
    """Column-wise standard error of the mean over rows (samples); 0 with fewer than two rows."""
    x = np.asarray(per_sample, dtype=float)
    if x.shape[0] < 2:
        return np.zeros(x.shape[1:])
    return x.std(axis=0, ddof=1) / math.sqrt(x.shape[0])


def significant_maxima(
    values: Sequence[Optional[float]], per_sample: Optional[Sequence[Sequence[float]]], lo: int, hi: int
) -> tuple[list[int], list[int]]:
    """(maxima that stand out, local maxima that do not), 1-indexed, within lo..hi. A local maximum of
    `values` stands out when it exceeds each neighbour by more than Z95 standard errors of the paired
    per-sample difference (the samples are the same at every layer, so their shared level cancels).
    Without per-sample values every local maximum counts."""
    clean = [x if x is not None else -1.0 for x in values]
    found = local_extrema(clean, lo, hi, "max")
    if per_sample is None:
        return found, []
    x = np.asarray(
        [[v if v is not None else np.nan for v in row] for row in per_sample], dtype=float
    )  # (samples, layers)
    keep, weak = [], []
    for layer in found:
        i = layer - 1
        right = i + 1
        while right < len(clean) and clean[right] == clean[i]:  # past a flat top
            right += 1
        sides = [j for j in (i - 1, right) if lo - 1 <= j <= hi - 1 and j != i]
        stands = True
        for j in sides:
            d = x[:, i] - x[:, j]
            d = d[np.isfinite(d)]
            se = float(standard_error(d[:, None])[0]) if len(d) else 0.0
            if not (d.mean() > Z95 * se if len(d) else False):
                stands = False
        (keep if stands else weak).append(layer)
    return keep, weak


def verdict(interval: Sequence[float], tolerance: float) -> str:
    """A sweep point's paired difference to all tokens against -tolerance: "loses" (the whole interval
    below it), "clear" (the whole interval above) or "inconclusive" (it straddles the threshold). The
    proposal counts every point that does not lose as within tolerance, and says which are inconclusive."""
    lo, hi = interval
    if hi < -tolerance:
        return "loses"
    if lo > -tolerance:
        return "clear"
    return "inconclusive"


def questions_to_resolve(difference: float, interval: Sequence[float], tolerance: float, n: int) -> Optional[int]:
    """About how many questions would make the interval clear -tolerance at the observed spread (its
    half-width shrinks as 1/sqrt(n)); None when the difference sits on the threshold."""
    half = (interval[1] - interval[0]) / 2
    gap = abs(difference + tolerance)
    if gap <= 1e-9:
        return None
    return max(n, math.ceil(n * (half / gap) ** 2))


def describe_point(label: str, diff: float, interval: Sequence[float], tolerance: float, n: int) -> str:
    """'L12: -1.0 [-3.5, +1.5] vs all tokens' plus, when it straddles -tolerance, the inconclusive note."""
    text = f"{label}: {diff:+.1f} [{interval[0]:+.1f}, {interval[1]:+.1f}] vs all tokens"
    if verdict(interval, tolerance) == "inconclusive":
        need = questions_to_resolve(diff, interval, tolerance, n)
        text += f" (inconclusive at {n} questions" + (
            f"; about {need} would resolve it at this spread)" if need else ")"
        )
    return text


def sweep_statistics(
    records: dict[str, dict[str, Sequence]], reference: str, n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """Per method: its score (mean over benchmarks of 100 x the mean question score), the percentile
    interval of that score, and its paired difference to `reference` with its interval. Each
    benchmark's units (`record.unit`: a question, an image pair, a group) are resampled jointly for every
    method, so the question difficulty they share cancels from the differences. `records`: method ->
    benchmark -> records with .id, .unit, .score (the same questions for every method)."""
    from hidrop.evaluation.uncertainty import unit_weights

    rng = np.random.default_rng(seed)
    ref = records[reference]
    draws = {}  # benchmark -> (question order, each question's weight in every resample)
    for bench, recs in ref.items():
        draws[bench] = ([r.id for r in recs], unit_weights([r.unit for r in recs], n_resamples, rng))
    out = {}
    resampled = {}
    for method, benches in records.items():
        points, stats = [], []
        for bench, (ids, weights) in draws.items():
            by_id = {r.id: r.score for r in benches[bench]}
            scores = np.array([by_id[i] for i in ids], dtype=float)
            points.append(100.0 * scores.mean())
            stats.append(100.0 * (weights @ scores) / weights.sum(axis=1))
        resampled[method] = np.mean(stats, axis=0)
        out[method] = {"score": float(np.mean(points)), "interval": _percentiles(resampled[method])}
    for method, row in out.items():
        diff = resampled[method] - resampled[reference]
        row["diff"] = row["score"] - out[reference]["score"]
        row["diff_interval"] = _percentiles(diff)
    return out


def _percentiles(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


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
    per_sample = {"intra": [], "cross": []}  # (samples, L) each: the spread as well as the mean
    ilvas_rows = {(k, n): [] for k in ks for n in ns}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ref_images = _reference_images(chunk, reference, samples)
        intra, cross, attention = _batch_stats(vlm, chunk, ref_images)
        per_sample["intra"].append(intra.numpy())
        per_sample["cross"].append(cross.numpy())
        for (k, n), rows in ilvas_rows.items():
            rows.append(_ilvas(attention, k, n).numpy())
    intra, cross = (np.concatenate(per_sample[key]) for key in ("intra", "cross"))
    ilvas = {key: np.concatenate(rows) for key, rows in ilvas_rows.items()}  # (samples, L - n)
    ilvas_mean_rows = _mean_ilvas(ilvas, len(intra), L)  # (samples, L), NaN where no (K, n) is defined
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers no (K, n) reaches: NaN, reported as None
        mean_row = np.nanmean(ilvas_mean_rows, axis=0) if len(ilvas) else np.full(L, np.nan)
    return {
        "num_layers": L,
        "num_vision_tokens": n_vis,
        "samples": len(intra),
        "reference": reference,
        "s_intra": intra.mean(0).tolist(),
        "s_intra_se": standard_error(intra).tolist(),
        "s_cross": cross.mean(0).tolist(),
        "s_cross_se": standard_error(cross).tolist(),
        "ilvas": {f"K{k}_n{n}": rows.mean(0).tolist() for (k, n), rows in ilvas.items()},
        "ilvas_k": ks,
        "ilvas_n": ns,
        "ilvas_mean": [None if math.isnan(v) else float(v) for v in mean_row],
        "ilvas_mean_se": [None if math.isnan(v) else float(v) for v in _nan_se(ilvas_mean_rows)],
        # per calibration sample: what the maxima test pairs (rounded: the JSON stays small)
        "ilvas_mean_per_sample": [
            [None if math.isnan(v) else round(float(v), 5) for v in row] for row in ilvas_mean_rows
        ],
    }


def _reference_images(chunk, reference: str, all_samples) -> list[Image.Image]:
    if reference == "gray":
        return [reference_image(s.load_image()) for s in chunk]
    if reference == "shuffled":  # the next calibration sample's image (a real but unrelated picture)
        index = {id(s): i for i, s in enumerate(all_samples)}
        return [all_samples[(index[id(s)] + 1) % len(all_samples)].load_image() for s in chunk]
    raise ValueError(f"reference must be 'gray' or 'shuffled', not {reference!r}")


def _mean_ilvas(ilvas: dict, count: int, L: int) -> np.ndarray:
    """Per sample, ILVAS averaged over every (K, n) defined at layer l (the paper found the maxima stable
    across them): (samples, L), NaN at layers where none is defined."""
    out = np.full((count, L), np.nan)
    for i in range(L):
        cols = [rows[:, i] for (_, n), rows in ilvas.items() if i < L - n]
        if cols:
            out[:, i] = np.mean(cols, axis=0)
    return out


def _nan_se(rows: np.ndarray) -> np.ndarray:
    se = np.full(rows.shape[1], np.nan)
    for i in range(rows.shape[1]):
        col = rows[:, i][np.isfinite(rows[:, i])]
        if len(col):
            se[i] = standard_error(col[:, None])[0]
    return se


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
    n_resamples: int = 1000,
) -> dict:
    """Scores of the exit and injection sweeps (one harness pass: the vision tower runs once per batch),
    each with its interval and its paired difference to all tokens on the same questions."""
    from hidrop.evaluation.harness import evaluate

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
        keep_records=True,
        n_resamples=0,  # the sweep's own paired statistics below, over the mean of the benchmarks
    )
    return sweeps_from_records(
        {m.method: {b: e.records for b, e in m.benchmarks.items()} for m in report.methods},
        [s.exit_layer for s in exits],
        [s.name for s in exits],
        [s.name for s in injects],
        n_resamples=n_resamples,
        seed=seed,
        samples=report.samples_evaluated,
        notes=report.notes,
    )


def sweeps_from_records(records: dict, layers: list[int], exit_names: list[str], inject_names: list[str], **kw) -> dict:
    """The sweep result from per-question records (see `sweep_statistics`): per layer the score, its
    interval, and the paired difference to all tokens with its interval; all tokens vs blind too."""
    stats = sweep_statistics(records, "all_tokens", n_resamples=kw.get("n_resamples", 1000), seed=kw.get("seed", 0))
    questions = sum(len(r) for r in records["all_tokens"].values())
    out = {"layers": layers}
    for kind, names in (("exit", exit_names), ("inject", inject_names)):
        out[kind] = [stats[n]["score"] for n in names]
        out[f"{kind}_interval"] = [stats[n]["interval"] for n in names]
        out[f"{kind}_diff"] = [stats[n]["diff"] for n in names]
        out[f"{kind}_diff_interval"] = [stats[n]["diff_interval"] for n in names]
    blind = stats["blind"]
    out.update(
        all_tokens=stats["all_tokens"]["score"],
        all_tokens_interval=stats["all_tokens"]["interval"],
        blind=blind["score"],
        blind_interval=blind["interval"],
        # all tokens minus blind: does the image matter at all on these questions?
        signal={"diff": -blind["diff"], "interval": [-blind["diff_interval"][1], -blind["diff_interval"][0]]},
        questions=questions,
        samples=kw.get("samples", questions),
        notes=list(kw.get("notes", [])),
    )
    out["signal"]["resolved"] = out["signal"]["interval"][0] > 0
    return out


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
            n = sweeps.get("questions", sweeps.get("samples", 0))
            k = sweeps["layers"].index(passive) + 1 if passive in sweeps["layers"] else 0
            diff, interval = _point(sweeps, "inject", k)
            late = f"L{sweeps['layers'][k]}"
            inject = passive
            why["inject_layer"] += (
                f"; but the injection sweep loses more than {tolerance:g} points when the image arrives at "
                f"{late} ({describe_point(late, diff, interval, tolerance, n)}: the whole interval lies "
                f"below -{tolerance:g}), so L{passive}"
            )
    return inject


def _point(sweeps: dict, kind: str, k: int) -> tuple[float, list[float]]:
    """Sweep point k's paired difference to all tokens and its interval (a point interval for sweeps
    recorded without intervals)."""
    diff = sweeps.get(f"{kind}_diff", [x - sweeps["all_tokens"] for x in sweeps[kind]])[k]
    intervals = sweeps.get(f"{kind}_diff_interval")
    return diff, (list(intervals[k]) if intervals else [diff, diff])


def _propose_exit(sweeps: Optional[dict], tolerance: float, why) -> Optional[int]:
    """Where the exit sweep's plateau starts: from there on, no point's interval lies wholly below
    -tolerance. None (vision to the end) without one."""
    if sweeps is None:
        why["exit_layer"] = "no exit sweep was run: vision stays to the end"
        return None
    n = sweeps.get("questions", sweeps.get("samples", 0))
    points = [_point(sweeps, "exit", k) for k in range(len(sweeps["layers"]))]
    start = len(points)
    for k in range(len(points) - 1, -1, -1):
        if verdict(points[k][1], tolerance) == "loses":
            break
        start = k
    if start >= len(points):
        diff, interval = points[-1]
        last = f"L{sweeps['layers'][-1]}"
        why["exit_layer"] = (
            f"even the last exit loses more than {tolerance:g} points "
            f"({describe_point(last, diff, interval, tolerance, n)}), so no plateau: vision stays to the end"
        )
        return None
    exit_layer = sweeps["layers"][start]
    diff, interval = points[start]
    reason = (
        f"from L{exit_layer} on, no exit's interval lies below -{tolerance:g} points: "
        f"{describe_point(f'L{exit_layer}', diff, interval, tolerance, n)}"
    )
    if start > 0:
        before = sweeps["layers"][start - 1]
        d0, i0 = points[start - 1]
        reason += f"; exiting before L{before} loses more ({describe_point(f'L{before}', d0, i0, tolerance, n)})"
    unsure = [
        sweeps["layers"][k] for k in range(start, len(points)) if verdict(points[k][1], tolerance) == "inconclusive"
    ]
    if unsure:
        reason += f"; inconclusive at {n} questions for {len(unsure)} of the {len(points) - start} exits from there"
    why["exit_layer"] = reason
    return exit_layer


def _propose_drops(curves: dict, inject: int, end: int, stages: int, why) -> list[int]:
    """Filtering layers: the most prominent ILVAS maxima inside the window that stand out of their spread
    over the calibration samples, else spread evenly."""
    lo, hi = inject, end - 2
    maxima, weak = significant_maxima(curves["ilvas_mean"], curves.get("ilvas_mean_per_sample"), lo, hi)
    chosen = sorted(maxima[:stages])
    spread = f"over {curves.get('samples', '?')} calibration samples"
    if chosen:
        why["drop_layers"] = (
            f"ILVAS local maxima in L{lo}..L{hi} that stand out of their spread {spread} "
            f"(> {Z95:g} standard errors above both neighbours), the {len(chosen)} most prominent: {chosen}"
        )
        if weak:
            why["drop_layers"] += f"; not {sorted(weak)}, within the spread"
        return chosen
    chosen = spread_layers(inject, end, max(1, min(stages, hi - lo + 1)))
    if weak:
        why["drop_layers"] = (
            f"ILVAS's local maxima in L{lo}..L{hi} ({sorted(weak)}) lie within their spread {spread} "
            f"(not {Z95:g} standard errors above a neighbour): {len(chosen)} layers spread evenly over the window"
        )
    else:
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
    """The deepest injection layer before the first one that loses more than `tolerance` points (its
    paired interval wholly below -tolerance): 1 when injecting at the first swept layer already loses."""
    deepest = 1
    for k, layer in enumerate(sweeps["layers"]):
        if verdict(_point(sweeps, "inject", k)[1], tolerance) == "loses":
            break
        deepest = layer
    return deepest


def default_budget(num_vision_tokens: int) -> float:
    """HiDrop Tok64's share of LLaVA-1.5's 576 tokens, at this model's token count."""
    return round(num_vision_tokens * 64 / 576, 2)
