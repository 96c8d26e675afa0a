"""Layer diagnostics (method.md section 6) and the schedule they propose, for any supported model.

All curves are indexed by layer, 1-indexed as in the paper (`curve[l - 1]` is layer l), computed on a
calibration set with the model unpruned:

- S_intra(l): mean cosine between each vision token's hidden state entering layer l and leaving it. A
  dip marks the layer where the vision tokens start to be rewritten.
- S_cross(l): 1 - mean cosine between the instruction tokens' states leaving layer l with the sample's
  image and with a reference image (uniform grey by default). Near 0 while no image information has
  reached the text.
- ILVAS(l, l+n, K): take the K vision tokens the last prompt token attends to most at layer l (head
  mean); for each of them, the cosine between its head-wise attention vector A_i (one entry per head: the
  attention the query gives token i in that head) at layer l and at l+n; averaged over the K tokens and
  the samples. High where the heads keep attending to the important tokens the same way, i.e. where
  filtering loses little. As in the paper, ILVAS is measured on the model configured with the chosen
  late injection and early exit (`ilvas_curves`): vision rows arrive raw at the injection layer and leave
  before the exit layer, so it is defined only for layers l..l+n inside that window.
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
    """S_intra, S_cross and ILVAS curves over `samples` (each must carry an image), on the unpruned model.
    The paper's ILVAS is that of the model with the chosen injection and exit: `ilvas_curves`."""
    samples = _with_images(samples)
    L, n_vis = vlm.num_layers, vlm.num_vision_tokens
    per_sample = {"intra": [], "cross": []}  # (samples, L) each: the spread as well as the mean
    attention = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        intra, cross, att = _batch_stats(vlm, chunk, _reference_images(chunk, reference, samples))
        per_sample["intra"].append(intra.numpy())
        per_sample["cross"].append(cross.numpy())
        attention.append(att)
    intra, cross = (np.concatenate(per_sample[key]) for key in ("intra", "cross"))
    return {
        "num_layers": L,
        "num_vision_tokens": n_vis,
        "samples": len(intra),
        "reference": reference,
        "s_intra": intra.mean(0).tolist(),
        "s_intra_se": standard_error(intra).tolist(),
        "s_cross": cross.mean(0).tolist(),
        "s_cross_se": standard_error(cross).tolist(),
        **_ilvas_summary(attention, ilvas_k, ilvas_n, L, n_vis, (1, None)),
    }


@torch.no_grad()
def ilvas_curves(
    vlm: VisionLanguageModel,
    samples: Sequence[Sample],
    inject_layer: int,
    exit_layer: Optional[int],
    *,
    ilvas_k: Sequence[int] = (5, 20, 50),
    ilvas_n: Sequence[int] = (4, 8),
    batch_size: int = 8,
) -> dict:
    """ILVAS as the paper measures it: on the model configured with late injection at `inject_layer` and
    early exit before `exit_layer` (None where a layer pair leaves that window). The keys of
    `layer_curves`' ILVAS, to replace them."""
    samples = _with_images(samples)
    attention = [
        _window_attention(vlm, samples[start : start + batch_size], inject_layer, exit_layer)
        for start in range(0, len(samples), batch_size)
    ]
    window = (inject_layer, exit_layer)
    return _ilvas_summary(attention, ilvas_k, ilvas_n, vlm.num_layers, vlm.num_vision_tokens, window)


def _with_images(samples: Sequence[Sample]) -> list[Sample]:
    samples = [s for s in samples if s.has_image]
    if not samples:
        raise ValueError("the calibration set has no sample with an image")
    return samples


def _ilvas_summary(attention: list, ilvas_k, ilvas_n, L: int, n_vis: int, window) -> dict:
    """ILVAS per (K, n), their mean, its standard error and per-sample values, from the chunks' head-wise
    attention (B, L, H, N); None where undefined (outside the window, or n past the last layer)."""
    ks = sorted({min(int(k), n_vis) for k in ilvas_k if int(k) > 0})
    ns = sorted({int(n) for n in ilvas_n if 0 < int(n) < L})
    ilvas = {(k, n): np.concatenate([_ilvas(a, k, n).numpy() for a in attention]) for k in ks for n in ns}
    count = sum(a.shape[0] for a in attention)
    rows = _mean_ilvas(ilvas, count, L)  # (samples, L), NaN where no (K, n) is defined
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers no (K, n) reaches: NaN, reported as None
        mean_row = np.nanmean(rows, axis=0) if len(ilvas) else np.full(L, np.nan)
        per_key = {key: np.nanmean(values, axis=0) for key, values in ilvas.items()}

    def clean(values, digits=None):
        return [None if math.isnan(v) else (round(float(v), digits) if digits else float(v)) for v in values]

    return {
        "ilvas": {f"K{k}_n{n}": clean(values) for (k, n), values in per_key.items()},
        "ilvas_k": ks,
        "ilvas_n": ns,
        "ilvas_window": list(window),  # the injection and exit layers ILVAS was measured under
        "ilvas_mean": clean(mean_row),
        "ilvas_mean_se": clean(_nan_se(rows)),
        "ilvas_mean_per_sample": [clean(row, 5) for row in rows],  # what the maxima test pairs
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
    across them; n reaching past the window's end is not defined): (samples, L), NaN where none is."""
    out = np.full((count, L), np.nan)
    for i in range(L):
        cols = [rows[:, i] for (_, n), rows in ilvas.items() if i < L - n and np.isfinite(rows[:, i]).all()]
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


def _prompt_batch(vlm: VisionLanguageModel, chunk: Sequence[Sample], extra_images: Sequence[Image.Image] = ()):
    """The chunk's prompts (left padded) and the projector outputs of their images, then of `extra_images`."""
    device = vlm.device
    tok = vlm.tokenizer
    template = get_template(vlm.template)
    kw = dict(image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_vision_tokens, for_generation=True)
    batch = Collator.for_tokenizer(tok, padding_side="left")([encode_sample(s, tok, template, **kw) for s in chunk])
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    images = [s.load_image() for s in chunk] + list(extra_images)
    pixels = torch.stack([vlm.image_processor(im) for im in images]).to(device)
    return ids, am, ids == vlm.image_token_id, vlm.vision_embeds(pixels)  # embeds: (images, N, D)


def _layer_mask(bb: Backbone, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The attention mask of a batch: causal over the allowed `keys`, each row seeing itself (no NaN)."""
    T = hidden.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
    allowed = (causal[None] & keys[:, None, :]) | torch.eye(T, dtype=torch.bool, device=hidden.device)[None]
    return bb.attention_mask(allowed[:, None], hidden.dtype)


def _batch_stats(vlm: VisionLanguageModel, chunk: Sequence[Sample], ref_images: list[Image.Image]):
    """Per sample, on the unpruned model: S_intra (B, L), S_cross (B, L) and head-wise attention to the
    vision tokens (B, L, H, N)."""
    ids, am, vision, embeds_all = _prompt_batch(vlm, chunk, ref_images)  # own images, then the references
    B, T = ids.shape
    bb = Backbone(vlm.lm)
    text = bb.embed(ids)
    hidden = torch.cat([text, text], 0).clone()
    both_vision = torch.cat([vision, vision], 0)
    hidden[both_vision] = embeds_all.reshape(-1, embeds_all.shape[-1]).to(text.dtype)
    mask2 = torch.cat([am, am], 0).bool()
    pos = (mask2.long().cumsum(1) - 1).clamp(min=0)
    attn_mask = _layer_mask(bb, hidden, mask2)
    rope = bb.rotary(hidden, pos)
    # the instruction: real text tokens after the image; the query: the last prompt token (left padding)
    after_image = vision.long().cumsum(1) >= vlm.num_vision_tokens
    instruction = am.bool() & ~vision & after_image
    last = T - 1
    L = vlm.num_layers
    intra = torch.zeros(B, L, dtype=torch.float64, device=hidden.device)
    cross = torch.zeros(B, L, dtype=torch.float64, device=hidden.device)
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


def _window_attention(vlm: VisionLanguageModel, chunk: Sequence[Sample], inject: int, exit_layer: Optional[int]):
    """Head-wise attention to the vision tokens (B, L, H, N) on the model configured with late injection
    at `inject` and early exit before `exit_layer`, as the engine runs it: before the injection layer only
    text is live (the image rows wait, untouched, as the projector made them), after the exit only text
    again; every token keeps its position. NaN at layers without vision tokens."""
    ids, am, vision, embeds = _prompt_batch(vlm, chunk)
    B, T = ids.shape
    bb = Backbone(vlm.lm)
    hidden = bb.embed(ids).clone()
    hidden[vision] = embeds.reshape(-1, embeds.shape[-1]).to(hidden.dtype)
    raw = hidden.clone()
    valid = am.bool()
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    rope = bb.rotary(hidden, pos)
    end = vlm.num_layers + 1 if exit_layer is None else exit_layer
    attention = []
    for idx in range(vlm.num_layers):
        layer = idx + 1
        live = inject <= layer < end
        keys = valid & (~vision if not live else torch.ones_like(vision))
        if layer == inject:
            hidden = torch.where(vision[..., None], raw, hidden)  # the image arrives as the projector made it
        attn_mask = _layer_mask(bb, hidden, keys)
        if live:
            attention.append(_vision_attention(bb, idx, hidden, pos, rope, keys, vision, T - 1))
        else:
            heads = bb.text_config.num_attention_heads
            attention.append(torch.full((B, heads, int(vision[0].sum())), float("nan"), device=hidden.device))
        hidden = bb.run_layer(idx, hidden, attn_mask, pos, rope, None)
    return torch.stack(attention, 1).cpu()


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
    """(B, L - n): for each layer l, take the k vision tokens with the most head-mean attention at l; for
    each, the cosine between its head-wise attention vector (H entries) at layer l and at l + n; the mean
    over the k tokens. NaN where layer l or l + n has no vision tokens (attention is NaN there)."""
    B, L, H, N = attention.shape
    out = torch.full((B, L - n), float("nan"), dtype=torch.float64)
    for l in range(L - n):
        if bool(torch.isnan(attention[:, l]).any() or torch.isnan(attention[:, l + n]).any()):
            continue
        top = attention[:, l].mean(1).topk(k, dim=-1).indices  # (B, k)
        a = attention[:, l].gather(2, top[:, None, :].expand(B, H, k))  # (B, H, k)
        b = attention[:, l + n].gather(2, top[:, None, :].expand(B, H, k))
        out[:, l] = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean(1)
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
    """A schedule (curve form fields) from the diagnostics, and the reason for every choice. The filtering
    layers come from the curves' ILVAS, which should be measured on the proposed window (`ilvas_curves`
    with `propose_window`'s layers), as the paper does."""
    L, n_vis = curves["num_layers"], curves["num_vision_tokens"]
    why: dict[str, str] = {}
    inject, exit_layer = propose_window(
        curves, sweeps, exit_tolerance=exit_tolerance, onset_fraction=onset_fraction, why=why
    )
    end = L + 1 if exit_layer is None else exit_layer
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


def propose_window(
    curves: dict,
    sweeps: Optional[dict],
    *,
    exit_tolerance: float = 2.0,
    onset_fraction: float = 0.1,
    why: Optional[dict] = None,
) -> tuple[int, Optional[int]]:
    """The injection layer and the exit layer (None: vision to the end) the diagnostics propose, with
    room for at least one drop between them; `why` receives the reasons."""
    why = {} if why is None else why
    L = curves["num_layers"]
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
    return inject, exit_layer


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
    measured = curves.get("ilvas_window") or [1, None]
    if list(measured) != [inject, end if end <= curves["num_layers"] else None]:
        spread += f" (ILVAS measured with injection at L{measured[0]}, exit {measured[1] or 'none'}, not this window)"
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
