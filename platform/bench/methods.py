"""Speed of every method on the same random-weight model, one run, ratios to vanilla: prefill,
generation, training step (`hidrop bench prefill|generate|train`, and the GPU check).

Timing is wall clock with warm-up and the median of repeats (CUDA-synchronised on GPU). Beside each
time: whole-model TFLOPs for the batch, so the gap between the token-count limit and the measured
speed-up is visible. The scoring overhead is measured directly: the same HiDrop forward with its
keep sets frozen (no scoring pass) versus with scoring, as a share of a vanilla forward.

Imports torch, transformers and hidrop only (no ray, mlflow or deepspeed): the GPU machine runs it from
the tree plus a few carried wheels.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from transformers import LlamaForCausalLM

from hidrop.cost import ModelShape, model_tflops
from hidrop.engine import ScheduledModel
from hidrop.models import DTYPES, llama_config
from hidrop.schedule import Schedule, preset
from hidrop_platform.config.schema import ExperimentConfig


def _random_lm(shape: ModelShape, dtype, device, attn: str) -> LlamaForCausalLM:
    """A random-weight Llama of `shape`, in `dtype` on `device`, in eval mode."""
    config = llama_config(shape)
    config._attn_implementation = attn
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call, with the GPU queue drained before and after."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _Setup:
    """One random-weight LM and one batch (a short system prompt, the image, then the question), shared by
    every method of a benchmark so that only the schedule differs."""

    def __init__(self, config: ExperimentConfig, device: Optional[str], small: Optional[bool], train: bool = False):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bench = config.bench
        self.small = (self.device == "cpu") if small is None else small
        self.shape = bench.cpu_shape if self.small else config.model.shape
        self.batch = bench.cpu_batch_size if self.small else bench.batch_size
        self.dtype = DTYPES[bench.dtype] if self.device != "cpu" else torch.float32
        self.attn = config.model.attn_implementation
        torch.manual_seed(config.seed)
        self.model = _random_lm(self.shape, self.dtype, self.device, self.attn)
        self.model.train(train)
        n_vis, text = self.shape.num_vision_tokens, bench.text_tokens
        self.text = text
        g = torch.Generator(device="cpu").manual_seed(config.seed)
        self.ids = torch.randint(3, self.shape.vocab_size, (self.batch, n_vis + text), generator=g).to(self.device)
        self.vision_mask = torch.zeros(self.batch, n_vis + text, dtype=torch.bool, device=self.device)
        self.vision_mask[:, 5 : 5 + n_vis] = True
        self.vision = torch.randn(self.batch * n_vis, self.shape.hidden_size, generator=g).to(self.device, self.dtype)
        self.methods: list[Schedule] = [preset(m, self.shape.num_layers, n_vis) for m in bench.methods]
        main = config.main_schedule.scaled_to(self.shape.num_layers, n_vis)
        if main not in self.methods and not main.is_vanilla():
            self.methods.append(main)

    def cost_shape(self, logits_positions: int) -> ModelShape:
        return self.shape.model_copy(update={"text_tokens": self.text, "logits_positions": logits_positions})

    def header(self, config: ExperimentConfig) -> dict:
        return {
            "experiment": config.name,
            "device": torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": self.attn,
            "shape": "cpu_shape (small)" if self.small else "model.shape",
            "model": self.shape.model_dump(exclude={"vision_encoder"}),
            "batch_size": self.batch,
            "sequence": {"vision_tokens": self.shape.num_vision_tokens, "text_tokens": self.text},
            "warmup": config.bench.warmup,
            "repeats": config.bench.repeats,
            "torch_threads": torch.get_num_threads(),
        }

    def peak_memory_gib(self, fn: Callable[[], object]) -> Optional[float]:
        if not self.device.startswith("cuda"):
            return None
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**30


def _round_robin(
    calls: list[tuple[str, Callable[[], object]]],
    warmup: int,
    repeats: int,
    device: str,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, list[float]]:
    """Each call once per round, round-robin, so slow drift of a shared machine affects all alike; the
    first `warmup` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name, _ in calls}
    for round_number in range(warmup + repeats):
        if progress:
            progress(f"round {round_number + 1}/{warmup + repeats}")
        for name, fn in calls:
            t = _timed_call(fn, device)
            if round_number >= warmup:
                times[name].append(t)
    return times


def _ratios(results: list[dict], time_key: str, cost_key: str) -> dict:
    """Speed-up and FLOPs ratio of every row to vanilla's (the first row without one); returns that row."""
    base = next((r for r in results if r["name"] == "vanilla"), results[0])
    for r in results:
        r["speedup_vs_vanilla"] = base[time_key] / r[time_key]
        r["flops_ratio_vs_vanilla"] = base[cost_key] / r[cost_key]
    return base


def run_prefill_bench(
    config: ExperimentConfig,
    device: Optional[str] = None,
    small: Optional[bool] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Prefill latency per method; also each pruned method with its keep sets frozen (no scoring pass),
    which measures the scoring overhead directly."""
    b = _Setup(config, device, small)
    cost_shape = b.cost_shape(logits_positions=1)
    variants: list[tuple[Schedule, Callable[[], object]]] = []
    frozen: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        for schedule in b.methods:
            sm = ScheduledModel(b.model, schedule)

            def forward(forced=None, sm=sm):
                return sm(
                    b.ids, vision_embeds=b.vision, vision_mask=b.vision_mask, logits_to_keep=1, forced_keep=forced
                )

            variants.append((schedule, forward))
            if schedule.drops:
                keeps = forward().keep_masks
                frozen[schedule.name] = lambda forward=forward, keeps=keeps: forward(keeps)
        calls = [(s.name, f) for s, f in variants] + [(f"{n}#frozen", f) for n, f in frozen.items()]
        times = _round_robin(calls, config.bench.warmup, config.bench.repeats, b.device, progress)
        results = []
        for schedule, forward in variants:
            median = statistics.median(times[schedule.name])
            row = {
                "name": schedule.name,
                "plan": schedule.describe(),
                "avg_vision_tokens": schedule.avg_tokens(),
                "latency_ms": 1000 * median,
                "latency_ms_all": [1000 * t for t in times[schedule.name]],
                "throughput_samples_s": b.batch / median,
                "model_tflops_per_sample": model_tflops(schedule, cost_shape),
                "peak_memory_gib": b.peak_memory_gib(forward),
            }
            if schedule.name in frozen:
                row["latency_ms_without_scoring"] = 1000 * statistics.median(times[f"{schedule.name}#frozen"])
            results.append(row)
    base = _ratios(results, "latency_ms", "model_tflops_per_sample")
    for r in results:
        if "latency_ms_without_scoring" in r:
            r["scoring_overhead_pct_of_vanilla"] = (
                100.0 * (r["latency_ms"] - r["latency_ms_without_scoring"]) / base["latency_ms"]
            )
    return {**b.header(config), "methods": results}


def _cache_mib(cache) -> float:
    """Keys and values the cache holds, in MiB (pruned layers hold fewer tokens, exited ones none)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20


def run_generate_bench(
    config: ExperimentConfig,
    device: Optional[str] = None,
    small: Optional[bool] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Greedy generation of `bench.new_tokens` tokens per method (no early stop): time to first token
    (the prefill that fills the cache), per-token decode time, the whole call, and the KV cache size."""
    b = _Setup(config, device, small)
    new = config.bench.new_tokens
    calls, caches, generators = [], {}, {}
    with torch.no_grad():
        for schedule in b.methods:
            sm = ScheduledModel(b.model, schedule)

            def prefill(sm=sm):
                return sm(b.ids, vision_embeds=b.vision, vision_mask=b.vision_mask, use_cache=True, logits_to_keep=1)

            def generate(sm=sm):
                return sm.generate(b.ids, vision_embeds=b.vision, vision_mask=b.vision_mask, max_new_tokens=new)

            calls += [(f"{schedule.name}#prefill", prefill), (schedule.name, generate)]
            generators[schedule.name] = generate
            caches[schedule.name] = _cache_mib(
                sm.generate(
                    b.ids, vision_embeds=b.vision, vision_mask=b.vision_mask, max_new_tokens=new, return_cache=True
                )[1]
            )
        times = _round_robin(calls, config.bench.warmup, config.bench.repeats, b.device, progress)
        results = []
        for schedule in b.methods:
            total = statistics.median(times[schedule.name])
            first = statistics.median(times[f"{schedule.name}#prefill"])
            row = {
                "name": schedule.name,
                "plan": schedule.describe(),
                "avg_vision_tokens": schedule.avg_tokens(),
                "latency_ms": 1000 * total,
                "latency_ms_all": [1000 * t for t in times[schedule.name]],
                "time_to_first_token_ms": 1000 * first,
                "decode_ms_per_token": 1000 * max(total - first, 0.0) / max(new - 1, 1),
                "tokens_per_s": b.batch * new / total,
                "kv_cache_mib": caches[schedule.name],
                "model_tflops_per_sample": model_tflops(schedule, b.cost_shape(logits_positions=1)),
                "peak_memory_gib": b.peak_memory_gib(generators[schedule.name]),
            }
            results.append(row)
    base = _ratios(results, "latency_ms", "model_tflops_per_sample")
    for r in results:
        r["decode_speedup_vs_vanilla"] = (
            base["decode_ms_per_token"] / r["decode_ms_per_token"] if r["decode_ms_per_token"] else None
        )
        r["ttft_speedup_vs_vanilla"] = base["time_to_first_token_ms"] / r["time_to_first_token_ms"]
    return {**b.header(config), "new_tokens": new, "methods": results}


def run_train_step_bench(
    config: ExperimentConfig,
    device: Optional[str] = None,
    small: Optional[bool] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """One training step per method: forward with the schedule active, LM loss on the question's last
    tokens, backward into every weight and into the vision embeddings (standing in for the projector).
    Dropped tokens shorten the sequence the later layers see, so the step gets cheaper, not just masked."""
    b = _Setup(config, device, small, train=True)
    labels = torch.full_like(b.ids, -100)
    labels[:, -8:] = b.ids[:, -8:]  # the answer: the last 8 text tokens
    vision = b.vision.clone().requires_grad_(True)
    # training FLOPs ~ 3 x forward (backward = 2 x forward), logits for every text position
    cost_shape = b.cost_shape(logits_positions=b.text)
    results, calls = [], []
    for schedule in b.methods:
        sm = ScheduledModel(b.model, schedule)

        def step(sm=sm):
            b.model.zero_grad(set_to_none=True)
            vision.grad = None
            out = sm(b.ids, vision_embeds=vision, vision_mask=b.vision_mask, labels=labels)
            out.loss.backward()
            return out

        calls.append((schedule.name, step))
    times = _round_robin(calls, config.bench.warmup, config.bench.repeats, b.device, progress)
    for (name, step), schedule in zip(calls, b.methods):
        median = statistics.median(times[name])
        results.append(
            {
                "name": name,
                "plan": schedule.describe(),
                "avg_vision_tokens": schedule.avg_tokens(),
                "latency_ms": 1000 * median,
                "latency_ms_all": [1000 * t for t in times[name]],
                "throughput_samples_s": b.batch / median,
                "train_tflops_per_sample": 3 * model_tflops(schedule, cost_shape),
                "peak_memory_gib": b.peak_memory_gib(step),
            }
        )
    _ratios(results, "latency_ms", "train_tflops_per_sample")
    b.model.zero_grad(set_to_none=True)
    return {**b.header(config), "methods": results}
