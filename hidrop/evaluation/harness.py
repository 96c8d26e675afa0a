"""Batched evaluation of schedules and baselines on registered benchmarks.

The loop is batch-major: each batch's images go through the vision tower once, then every method
(the schedules under test and the baselines) runs on the same batch. Baselines:
- all_tokens: the unpruned model (the reference of the relative score),
- blind: the same questions with no image at all,
- random: the main schedule's keep counts, tokens chosen uniformly at random,
- oracle: the main schedule's keep counts, evidence tokens first (benchmarks with evidence only).
Random and oracle replay their choices through the engine's `forced_keep`, nested across drops.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import torch
from pydantic import ValidationError

from hidrop.cost import ModelShape, VisionEncoderShape, cost_report, text_only_tflops
from hidrop.data import Collator, encode_sample, get_template
from hidrop.errors import UserError
from hidrop.evaluation.metrics import evidence_recall, mean, relative_score
from hidrop.evaluation.registry import Benchmark, relative_benchmarks
from hidrop.evaluation.results import (
    BenchmarkPlan,
    BenchmarkResult,
    EvalReport,
    MethodResult,
    ModelInfo,
    QuestionRecord,
)
from hidrop.evaluation.uncertainty import N_RESAMPLES, attach_intervals
from hidrop.models import VisionLanguageModel, lm_shape_fields
from hidrop.sample import Sample
from hidrop.schedule import Schedule, first_error_line, vanilla

BASELINES = ("all_tokens", "blind", "random", "oracle")
Known = dict[str, dict[str, dict[str, QuestionRecord]]]  # method -> benchmark -> question id -> its record
REFERENCE = "all_tokens"
MODES = ("auto", "closed", "generate")


class EvalError(UserError, ValueError):
    """A benchmark/model combination that cannot be evaluated as asked (one-line message)."""


@dataclasses.dataclass
class Method:
    name: str
    schedule: Schedule
    kind: str  # "schedule" or one of BASELINES


def _methods(schedules: Sequence[Schedule], baselines: Sequence[str], n_layers: int, n_vis: int) -> list[Method]:
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvalError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    if not schedules:
        raise EvalError("nothing to evaluate: no schedule given")
    unpruned = vanilla(n_layers, n_vis).model_copy(update={"name": REFERENCE})
    methods = [Method(REFERENCE, unpruned, REFERENCE)]  # always: it is the reference
    seen = set(BASELINES)  # a schedule named "oracle" must not overwrite the oracle baseline's row
    for s in schedules:
        if s.is_vanilla():
            continue  # identical to all_tokens; reported under that name
        name = s.name if s.name not in seen else f"{s.name}#{len(methods)}"
        seen.add(name)
        methods.append(Method(name, s, "schedule"))
    main = next((s for s in schedules if not s.is_vanilla()), None)
    for b in baselines:
        if b == REFERENCE:
            continue
        if b in ("random", "oracle") and main is None:
            continue  # nothing is pruned: random/oracle would equal all_tokens
        methods.append(Method(b, main if b in ("random", "oracle") else unpruned.model_copy(update={"name": b}), b))
    return methods


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):  # pydantic: the first error's message, not the banner
        return first_error_line(e)
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _first_token_ids(tokenizer, candidates: Sequence[str]) -> list[list[int]]:
    """Per candidate, the first-token ids of its spellings: the candidate itself (which must be unique:
    else EvalError) plus its capitalized form when that first token belongs to no other candidate."""
    unk = getattr(tokenizer, "unk_token_id", None)

    def first(text: str) -> Optional[int]:
        toks = tokenizer.encode(text, add_special_tokens=False)
        return toks[0] if toks else None

    primary = [first(c) for c in candidates]
    owner: dict[int, str] = {}
    for cand, t in zip(candidates, primary):
        if t in owner:
            raise EvalError(
                f"candidates {owner[t]!r} and {cand!r} share their first token under this tokenizer; "
                "closed-vocabulary scoring cannot tell them apart (use eval.mode=generate)"
            )
        owner[t] = cand
    variants = [first(c.capitalize()) for c in candidates]
    counts: dict[int, int] = {}
    for v in variants:
        counts[v] = counts.get(v, 0) + 1
    out = []
    for t, v in zip(primary, variants):
        ids = [t]
        if v is not None and v != t and v != unk and v not in owner and counts[v] == 1:
            ids.append(v)
        out.append(ids)
    return out


def model_shape(vlm: VisionLanguageModel, text_tokens: int) -> ModelShape:
    """The cost-accounting shape of a loaded model; the vision tower is measured, not assumed."""
    cfg = vlm.lm.config
    cfg = cfg.text_config if hasattr(cfg, "text_config") else cfg
    encoder = None
    if vlm.image_processor is not None and (vlm.kind != "llama" or vlm.vision_fn is not None):
        encoder = VisionEncoderShape(fixed_gmacs=_vision_gmacs(vlm))
    return ModelShape(
        **lm_shape_fields(cfg),
        num_vision_tokens=vlm.num_vision_tokens,
        text_tokens=max(0, int(round(text_tokens))),
        vision_encoder=encoder,
        projector_hidden_size=None,  # measured together with the encoder
    )


_GMACS_CACHE: dict[int, float] = {}


def _vision_gmacs(vlm: VisionLanguageModel) -> float:
    key = id(vlm.model)
    if key not in _GMACS_CACHE:
        from PIL import Image
        from torch.utils.flop_counter import FlopCounterMode

        pixels = vlm.image_processor(Image.new("RGB", (64, 64)))[None].to(vlm.device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            vlm.vision_embeds(pixels)
        _GMACS_CACHE[key] = counter.get_total_flops() / 2 / 1e9  # FLOPs -> MACs, the paper's convention
    return _GMACS_CACHE[key]


class _Batch:
    """One batch of samples, encoded with and without the image, plus its vision embeddings."""

    def __init__(self, vlm: VisionLanguageModel, samples: Sequence[Sample], template, need_blind: bool):
        device = vlm.device
        tok = vlm.tokenizer
        collate = Collator.for_tokenizer(tok, padding_side="left")
        kw = dict(image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_vision_tokens, for_generation=True)
        self.samples = list(samples)
        enc = [encode_sample(s, tok, template, **kw) for s in samples]
        b = collate(enc)
        self.input_ids, self.attention_mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        self.vision = self.input_ids == vlm.image_token_id
        self.image_rows = [i for i, s in enumerate(samples) if s.has_image]
        self.vision_embeds = None
        if self.image_rows:
            images = [samples[i].load_image() for i in self.image_rows]
            pixels = torch.stack([vlm.image_processor(im) for im in images]).to(device)
            with torch.no_grad():
                self.vision_embeds = vlm.vision_embeds(pixels)  # (n_img, N, D)
        self.blind = None
        if need_blind:
            eb = collate([encode_sample(dataclasses.replace(s, image=None), tok, template, **kw) for s in samples])
            self.blind = (eb["input_ids"].to(device), eb["attention_mask"].to(device))

    def forced_keep(self, schedule: Schedule, priority: torch.Tensor) -> list[torch.Tensor]:
        """Nested keep masks (one per drop) in the (B, L) layout: the top-k of `priority` (n_img, N)."""
        order = priority.argsort(dim=1, descending=True)
        masks = []
        for k in schedule.keep_counts:
            grid_keep = torch.zeros_like(priority, dtype=torch.bool).scatter_(1, order[:, :k], True)
            full = torch.zeros_like(self.vision)
            full[self.vision] = grid_keep.flatten()
            masks.append(full)
        return masks


def evaluate(
    vlm: VisionLanguageModel,
    schedules: Sequence[Schedule],
    benchmarks: Sequence[Benchmark],
    *,
    baselines: Sequence[str] = BASELINES,
    mode: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[int, int, str], None]] = None,
    keep_predictions: bool = False,
    known: Optional[Known] = None,
    select: Optional[Callable[[Benchmark, list[Sample]], list[Sample]]] = None,
    keep_records: bool = False,
    require_signal: bool = False,
    n_resamples: int = N_RESAMPLES,
    relative: Optional[Sequence[str]] = None,
) -> EvalReport:
    """Score every schedule and baseline on every benchmark.

    progress(done_batches, total_batches, label) is called after each batch. `known` (method ->
    benchmark -> question id -> record, from an earlier run with the same model, benchmarks and seed)
    is reused instead of re-run: a search evaluates its reference once and pairs every trial with its
    stored per-question scores, and a trial evaluated in growing rungs never scores a question twice.
    `select(benchmark, samples)` narrows each benchmark's questions (a rung, or the unseen questions of
    a held-out confirmation). Every score gets a bootstrap interval (`n_resamples`,
    hidrop.evaluation.uncertainty); `keep_records` keeps every question's record; `require_signal`
    leaves benchmarks where all tokens is not significantly above blind out of the relative score.
    `relative`: the benchmarks the relative score averages (default: every non-diagnostic one; the
    others are still scored, with intervals).
    """
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if vlm.tokenizer is None:
        raise EvalError("the model has no tokenizer; evaluation needs one")
    n_layers, n_vis = vlm.num_layers, vlm.num_vision_tokens
    for s in schedules:
        if s.num_layers != n_layers or s.num_vision_tokens != n_vis:
            raise EvalError(
                f"schedule {s.name!r} is for {s.num_layers} layers / {s.num_vision_tokens} tokens, "
                f"the model has {n_layers} / {n_vis}"
            )
    names = [b.name for b in benchmarks]
    unknown = sorted(set(relative or ()) - set(names))
    if unknown:
        raise EvalError(f"relative: {', '.join(unknown)} not among the evaluated benchmarks ({', '.join(names)})")
    over = relative_benchmarks(names, relative)
    methods = _methods(schedules, baselines, n_layers, n_vis)
    plans, fallback_notes = _plans(vlm, benchmarks, mode, select)
    start = time.perf_counter()
    run = _Run(batch_size, max_new_tokens, seed, keep_predictions, keep_records, known or {})
    per_method, text_tokens = _score_plans(vlm, methods, plans, run, progress)
    wall = time.perf_counter() - start
    report = _report(vlm, methods, per_method, plans, mean(text_tokens) if text_tokens else 0.0, wall, over)
    report.questions_run, report.batches_run = run.questions_run, run.batches_run
    report.notes = fallback_notes + report.notes
    raw = {m.name: per_method[m.name]["raw"] for m in methods}
    attach_intervals(report, plans, raw, seed=seed, require_signal=require_signal, n_resamples=n_resamples)
    return report


def at_grid(vlm: VisionLanguageModel, benchmarks: Sequence[Benchmark]) -> list[Benchmark]:
    """The benchmarks as `evaluate` runs them: at the model's token grid (the probes' evidence follows it)."""
    return [b.for_grid(vlm.grid) if hasattr(b, "for_grid") and vlm.grid else b for b in benchmarks]


def _plans(vlm: VisionLanguageModel, benchmarks: Sequence[Benchmark], mode: str, select=None) -> tuple[list, list[str]]:
    """Per benchmark: (benchmark at the model's grid, its samples, its scoring mode, first-token ids per
    candidate set), and the notes of benchmarks that fell back from closed scoring to generation."""
    benches = at_grid(vlm, benchmarks)
    plans, fallback_notes = [], []
    for bench in benches:
        try:
            samples = bench.samples()
        except (ValueError, TypeError, FileNotFoundError) as e:  # bad options, missing data files
            raise EvalError(f"benchmark {bench.name!r}: {_one_line(e)}") from None
        if select is not None:
            samples = list(select(bench, samples))
        if not samples:
            raise EvalError(f"benchmark {bench.name!r} yielded no samples")
        bench_mode = bench.default_mode if mode == "auto" else mode
        if bench_mode == "closed" and any(not s.candidates for s in samples):
            raise EvalError(
                f"benchmark {bench.name!r} has open answers; closed-vocabulary scoring needs candidates (mode=generate)"
            )
        cand_ids: dict[tuple, list[list[int]]] = {}  # candidate set -> first-token ids per candidate
        if bench_mode == "closed":
            try:
                cand_ids = {c: _first_token_ids(vlm.tokenizer, c) for c in {tuple(s.candidates) for s in samples}}
            except EvalError as e:  # e.g. a tokenizer that spells digits as "▁" + digit
                if mode != "auto":
                    raise
                bench_mode = "generate"
                fallback_notes.append(f"{bench.name}: {e}; scored by generation instead")
        plans.append((bench, samples, bench_mode, cand_ids))
    return plans, fallback_notes


@dataclasses.dataclass
class _Run:
    """How `evaluate` runs, and what it counted: (method, question) pairs scored and method x batch passes."""

    batch_size: int
    max_new_tokens: int
    seed: int
    keep_predictions: bool
    keep_records: bool
    known: Known
    questions_run: int = 0
    batches_run: int = 0

    def known_for(self, method: str, bench: str) -> dict[str, QuestionRecord]:
        return self.known.get(method, {}).get(bench, {})


def _score_plans(vlm, methods: list[Method], plans, run: _Run, progress):
    """Every method on every plan's batches (each batch's images once through the vision tower), skipping
    the questions `run.known` already scored for a method; returns per-method benchmark results and
    counts, and the mean text length per batch."""
    template = get_template(vlm.template)
    n_vis = vlm.num_vision_tokens
    todo = {
        p[0].name: {
            m.name: [i for i, s in enumerate(p[1]) if s.id not in run.known_for(m.name, p[0].name)] for m in methods
        }
        for p in plans
    }
    running = {m.name for m in methods if any(todo[b][m.name] for b in todo)}
    engines = {m.name: vlm.scheduled(m.schedule) for m in methods if m.name in running}
    run_indices = {b: sorted(set().union(*t.values())) for b, t in todo.items()}
    total_batches = sum(math.ceil(len(idx) / run.batch_size) for idx in run_indices.values())
    done = 0
    per_method: dict[str, dict] = {m.name: {"benchmarks": {}, "raw": {}, "vision_counts": []} for m in methods}
    text_tokens = []
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        for bench, samples, bench_mode, cand_ids in plans:
            measured: dict[str, dict[int, tuple[float, str]]] = {m.name: {} for m in methods}
            recalls = {m.name: [] for m in methods}
            indices = run_indices[bench.name]
            active = [m for m in methods if todo[bench.name][m.name]]
            for b0 in range(0, len(indices), run.batch_size):
                rows = indices[b0 : b0 + run.batch_size]
                chunk = [samples[i] for i in rows]
                batch = _Batch(vlm, chunk, template, need_blind=any(m.kind == "blind" for m in active))
                text_tokens.append(float(((batch.attention_mask.bool()) & ~batch.vision).sum(1).float().mean()))
                gen = torch.Generator().manual_seed(run.seed * 1_000_003 + done)
                noise = None if batch.vision_embeds is None else torch.rand(len(batch.image_rows), n_vis, generator=gen)
                for m in active:
                    texts, keep_masks, counts = _run_method(
                        vlm, engines[m.name], m, batch, bench_mode, cand_ids, run.max_new_tokens, noise
                    )
                    for i, s, text in zip(rows, chunk, texts):
                        measured[m.name][i] = (bench.score(s, text), text)
                    run.questions_run += len(chunk)
                    run.batches_run += 1
                    if counts is not None:
                        per_method[m.name]["vision_counts"].append(counts)
                    if keep_masks and batch.vision_embeds is not None:
                        recalls[m.name].extend(_recalls(batch, keep_masks))
                done += 1
                if progress is not None:
                    progress(done, total_batches, bench.name)
            for m in methods:
                known = run.known_for(m.name, bench.name)
                pairs = [
                    measured[m.name][i] if i in measured[m.name] else (known[s.id].score, known[s.id].prediction)
                    for i, s in enumerate(samples)
                ]
                scores, preds = [p[0] for p in pairs], [p[1] for p in pairs]
                figures = bench.aggregate(samples, scores)
                rec = recalls[m.name]
                extra: dict = {}
                if rec and any(x is not None for r in rec for x in r):
                    extra["evidence_recall"] = [mean(r[i] for r in rec if r[i] is not None) for i in range(len(rec[0]))]
                if run.keep_predictions:
                    extra["predictions"] = {s.id: p for s, p in zip(samples, preds)}
                if run.keep_records:
                    extra["records"] = [
                        QuestionRecord(
                            id=s.id, family=s.family, prediction=p, reference=s.answer, score=sc, unit=bench.unit(s)
                        )
                        for s, p, sc in zip(samples, preds, scores)
                    ]
                per_method[m.name]["raw"][bench.name] = scores
                per_method[m.name]["benchmarks"][bench.name] = BenchmarkResult(
                    **figures, samples=len(samples), mode=bench_mode, **extra
                )
        for m in methods:
            per_method[m.name]["reused"] = m.name not in running
    finally:
        vlm.model.train(was_training)
    return per_method, text_tokens


def known_records(report: EvalReport, methods: Optional[Sequence[str]] = None) -> Known:
    """A report's per-question records as `evaluate(known=...)` takes them (kept with keep_records=True)."""
    out: Known = {}
    for m in report.methods:
        if methods is not None and m.method not in methods:
            continue
        out[m.method] = {b: {r.id: r for r in (e.records or [])} for b, e in m.benchmarks.items()}
    return out


def generate_answers(
    vlm: VisionLanguageModel,
    schedule: Schedule,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of `vlm` under `schedule`, one per sample, batched exactly as `evaluate` batches
    them (for integrations such as the lmms-eval plugin, which score the answers themselves)."""
    template = get_template(vlm.template)
    engine = vlm.scheduled(schedule)
    method = Method(schedule.name, schedule, "schedule")
    answers: list[str] = []
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        for b0 in range(0, len(samples), batch_size):
            batch = _Batch(vlm, samples[b0 : b0 + batch_size], template, need_blind=False)
            texts, _, _ = _run_method(vlm, engine, method, batch, "generate", None, max_new_tokens, None)
            answers.extend(texts)
    finally:
        vlm.model.train(was_training)
    return answers


def _run_method(vlm, engine, m: Method, batch: _Batch, mode, cand_ids, max_new_tokens, noise):
    """Predictions (strings), keep masks after each drop, and measured vision tokens per layer."""
    if m.kind == "blind":
        ids, am = batch.blind
        vis_embeds, vis_mask = None, torch.zeros_like(ids, dtype=torch.bool)
    else:
        ids, am = batch.input_ids, batch.attention_mask
        vis_embeds = None if batch.vision_embeds is None else batch.vision_embeds.flatten(0, 1)
        vis_mask = batch.vision
    forced = None
    if m.kind in ("random", "oracle") and noise is not None and m.schedule.drops:
        priority = noise.clone()
        if m.kind == "oracle":
            for j, row in enumerate(batch.image_rows):
                ev = batch.samples[row].evidence
                if ev:
                    priority[j, list(ev)] += 1.0  # evidence first, random order among the rest
        forced = batch.forced_keep(m.schedule, priority.to(ids.device))
    tok = vlm.tokenizer
    with torch.no_grad():
        if mode == "closed":
            out = engine(ids, am, vision_embeds=vis_embeds, vision_mask=vis_mask, logits_to_keep=1, forced_keep=forced)
            logp = out.logits[:, -1].float().log_softmax(-1)
            texts = []
            for row, s in enumerate(batch.samples):
                ids_per_cand = cand_ids[tuple(s.candidates)]
                best = max(
                    range(len(s.candidates)), key=lambda c: float(torch.logsumexp(logp[row, ids_per_cand[c]], 0))
                )
                texts.append(s.candidates[best])
            keep_masks, counts = out.keep_masks, out.layer_vision_counts
        else:
            eos = [
                t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int) and t >= 0
            ]
            seqs, _, keep_masks = engine.generate(
                ids,
                am,
                vision_embeds=vis_embeds,
                vision_mask=vis_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos or None,
                return_cache=True,
                forced_keep=forced,
            )
            new = seqs[:, ids.shape[1] :]
            texts = [tok.decode(row, skip_special_tokens=True) for row in new.tolist()]
            counts = None
    if counts is not None:  # (num_layers, B): average over the rows that carry an image
        rows = batch.image_rows if m.kind != "blind" else list(range(ids.shape[0]))
        counts = (counts[:, rows].float().sum().item(), counts.shape[0] * len(rows)) if rows else None
    return texts, keep_masks, counts


def _recalls(batch: _Batch, keep_masks: list[torch.Tensor]) -> list[list[Optional[float]]]:
    """Per image row: evidence recall after each drop."""
    out = []
    grids = [mask[batch.vision].view(len(batch.image_rows), -1).cpu() for mask in keep_masks]
    for j, row in enumerate(batch.image_rows):
        ev = batch.samples[row].evidence
        out.append([evidence_recall(g[j].tolist(), ev) for g in grids])
    return out


def _weighted(pairs: list[tuple[float, int]]) -> Optional[float]:
    total = sum(n for _, n in pairs)
    return sum(v for v, _ in pairs) / total if total else None


def _report(
    vlm,
    methods: list[Method],
    per_method: dict,
    plans,
    text_tokens: float,
    wall: float,
    over: Sequence[str],
) -> EvalReport:
    shape = model_shape(vlm, text_tokens)
    scores = {m.name: {b: e.score for b, e in per_method[m.name]["benchmarks"].items()} for m in methods}
    reference = scores[REFERENCE]
    rows = []
    for m in methods:
        cost = cost_report(m.schedule, shape)
        if m.kind == "blind":
            cost.update(avg_vision_tokens=0.0, vision_tflops=0.0, model_tflops=text_only_tflops(shape), plan="no image")
        rows.append(
            MethodResult(
                method=m.name,
                kind=m.kind,
                schedule=m.schedule.model_dump(mode="json") if m.kind != "blind" else None,
                plan=cost["plan"],
                benchmarks=per_method[m.name]["benchmarks"],
                relative_score=relative_score({b: v for b, v in scores[m.name].items() if b in over}, reference),
                avg_vision_tokens=cost["avg_vision_tokens"],
                measured_avg_vision_tokens=_weighted(per_method[m.name]["vision_counts"]),
                vision_tflops=cost["vision_tflops"],
                model_tflops=cost["model_tflops"],
                reused=per_method[m.name]["reused"],
            )
        )
    notes = []
    left_out = [b for b in reference if b not in over]
    if left_out:
        notes.append(
            f"{', '.join(left_out)}: scored, not in the relative score (over {', '.join(over)}; "
            "diagnostic by default, eval.relative chooses)"
        )
    blind = scores.get("blind")
    if blind:
        gap = mean(reference[b] - blind[b] for b in reference if b in blind)
        if gap < 5.0:
            notes.append(
                f"all_tokens is only {gap:.1f} points above the blind baseline on average: the model barely uses "
                "the image (e.g. an untrained projector), so scores and relative scores say little about the schedules"
            )
    if getattr(vlm, "projector_trained", True) is False:
        notes.append("the projector is untrained (fresh mini-LLaVA): expect scores near the blind baseline")
    return EvalReport(
        model=ModelInfo(kind=vlm.kind, num_layers=vlm.num_layers, num_vision_tokens=vlm.num_vision_tokens),
        reference=REFERENCE,
        methods=rows,
        samples_evaluated=sum(len(p[1]) for p in plans),
        benchmarks=[BenchmarkPlan(name=b.name, samples=len(s), mode=md) for b, s, md, _ in plans],
        mean_text_tokens=text_tokens,
        wall_time_s=wall,
        notes=notes,
        relative_over=list(over),
    )
