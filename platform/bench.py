"""Prefill benchmark: every method on the same random-weight model, one run, ratios to vanilla.

Timing is wall clock with warm-up and the median of repeats (CUDA-synchronised on GPU). Beside each
time: whole-model TFLOPs for the batch, so the gap between the token-count limit and the measured
speed-up is visible. The scoring overhead is measured directly: the same HiDrop forward with its
keep sets frozen (no scoring pass) versus with scoring, as a share of a vanilla forward.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hidrop.cost import ModelShape, model_tflops
from hidrop.engine import ScheduledModel
from hidrop.schedule import Schedule, preset
from hidrop_platform.config import ExperimentConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _random_lm(shape: ModelShape, dtype, device, attn: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=4096,
    )
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


def run_prefill_bench(
    config: ExperimentConfig,
    device: Optional[str] = None,
    small: Optional[bool] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bench = config.bench
    small = (device == "cpu") if small is None else small
    shape = bench.cpu_shape if small else config.model.shape
    batch = bench.cpu_batch_size if small else bench.batch_size
    dtype = DTYPES[bench.dtype] if device != "cpu" else torch.float32
    attn = config.model.attn_implementation
    torch.manual_seed(config.seed)
    model = _random_lm(shape, dtype, device, attn)

    n_vis, text = shape.num_vision_tokens, bench.text_tokens
    L = n_vis + text
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    ids = torch.randint(3, shape.vocab_size, (batch, L), generator=g).to(device)
    vision_mask = torch.zeros(batch, L, dtype=torch.bool, device=device)
    vision_mask[:, 5:5 + n_vis] = True  # a short system prompt, the image, then the question
    vision = torch.randn(batch * n_vis, shape.hidden_size, generator=g).to(device, dtype)

    methods: list[Schedule] = [preset(m, shape.num_layers, n_vis) for m in bench.methods]
    main = config.main_schedule.scaled_to(shape.num_layers, n_vis)
    if main not in methods and not main.is_vanilla():
        methods.append(main)
    cost_shape = shape.model_copy(update={"text_tokens": text, "logits_positions": 1})

    # Every timed variant (each method, and each pruned method with its keep sets frozen so that no
    # scoring pass runs) is timed once per round, round-robin, so slow drift of a shared machine
    # affects all of them alike; the median over rounds is reported.
    variants: list[tuple[Schedule, Callable[[], object]]] = []
    frozen: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        for schedule in methods:
            sm = ScheduledModel(model, schedule)

            def forward(forced=None, sm=sm):
                return sm(ids, vision_embeds=vision, vision_mask=vision_mask, logits_to_keep=1, forced_keep=forced)

            variants.append((schedule, forward))
            if schedule.drops:
                keeps = forward().keep_masks
                frozen[schedule.name] = lambda forward=forward, keeps=keeps: forward(keeps)
        calls = [(s.name, f) for s, f in variants] + [(f"{n}#frozen", f) for n, f in frozen.items()]
        times: dict[str, list[float]] = {name: [] for name, _ in calls}
        for round_number in range(bench.warmup + bench.repeats):
            if progress:
                progress(f"round {round_number + 1}/{bench.warmup + bench.repeats}")
            for name, fn in calls:
                t = _timed_call(fn, device)
                if round_number >= bench.warmup:
                    times[name].append(t)
        results = []
        for schedule, forward in variants:
            peak = None
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                forward()
                peak = torch.cuda.max_memory_allocated() / 2**30
            median = statistics.median(times[schedule.name])
            row = {
                "name": schedule.name,
                "plan": schedule.describe(),
                "avg_vision_tokens": schedule.avg_tokens(),
                "latency_ms": 1000 * median,
                "latency_ms_all": [1000 * t for t in times[schedule.name]],
                "throughput_samples_s": batch / median,
                "model_tflops_per_sample": model_tflops(schedule, cost_shape),
                "peak_memory_gib": peak,
            }
            if schedule.name in frozen:
                row["latency_ms_without_scoring"] = 1000 * statistics.median(times[f"{schedule.name}#frozen"])
            results.append(row)
    base = next((r for r in results if r["name"] == "vanilla"), results[0])
    for r in results:
        r["speedup_vs_vanilla"] = base["latency_ms"] / r["latency_ms"]
        r["flops_ratio_vs_vanilla"] = base["model_tflops_per_sample"] / r["model_tflops_per_sample"]
        if "latency_ms_without_scoring" in r:
            r["scoring_overhead_pct_of_vanilla"] = (
                100.0 * (r["latency_ms"] - r["latency_ms_without_scoring"]) / base["latency_ms"]
            )
    return {
        "experiment": config.name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "shape": "cpu_shape (small)" if small else "model.shape",
        "model": shape.model_dump(exclude={"vision_encoder"}),
        "batch_size": batch,
        "sequence": {"vision_tokens": n_vis, "text_tokens": text},
        "warmup": bench.warmup,
        "repeats": bench.repeats,
        "torch_threads": torch.get_num_threads(),
        "methods": results,
    }


# ---- training step: Ray Train + DeepSpeed vs a plain loop ------------------------------------------
def run_train_bench(cfg: ExperimentConfig, steps: int = 12, warmup: int = 3, storage: Optional[str] = None,
                    repeats: int = 1) -> dict:
    """Median optimizer-step time of `hidrop train` (one Ray worker running DeepSpeed) and of a plain
    single-process loop over the same model, data order, batch size and thread count; ratio of the two.

    With repeats > 1 the two paths alternate and the reported ratio is the median of the per-pair
    ratios: on a small shared machine the run-to-run noise is larger than the overhead being measured.
    """
    import tempfile

    import ray

    from hidrop_platform.train import STEP_TIMES_FILE, run_training

    t = cfg.train
    threads = max(1, int(t.resources_per_worker.get("CPU", 1)))
    total = warmup + steps
    storage = storage or tempfile.mkdtemp(prefix="hidrop-bench-")
    pairs = []
    for r in range(repeats):
        ray_cfg = cfg.model_copy(deep=True)
        # log once (at the end): per-step log lines make Ray's log monitor compete for the same cores
        ray_cfg.train = t.model_copy(update={"num_workers": 1, "max_steps": total, "checkpoint_every": 10**9,
                                             "log_every": total, "export_every": None,
                                             "storage_path": str(Path(storage) / f"repeat-{r}"), "max_failures": 0})
        ray_cfg.tracking = cfg.tracking.model_copy(update={"enabled": False})
        run_training(ray_cfg)
        ray_times = json.loads((Path(storage) / f"repeat-{r}" / cfg.name / STEP_TIMES_FILE).read_text())[warmup:]
        ray.shutdown()  # the plain loop must not share the cores with an idle Ray cluster
        plain_times = _plain_loop_times(cfg, total, threads)[warmup:]
        pairs.append((statistics.median(plain_times), statistics.median(ray_times)))
    ratios = [r / p for p, r in pairs]
    return {
        "experiment": cfg.name, "steps_timed": steps, "warmup": warmup, "threads": threads, "repeats": repeats,
        "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "zero_stage": t.zero_stage,
        "plain_step_s": statistics.median(p for p, _ in pairs),
        "ray_deepspeed_step_s": statistics.median(r for _, r in pairs),
        "overhead_ratio": statistics.median(ratios), "pair_ratios": ratios,
        "goal": "<= 1.10x",
    }


def _plain_loop_times(cfg: ExperimentConfig, total: int, threads: int) -> list[float]:
    """The plain loop: the same pieces as the worker, no Ray, no DeepSpeed."""
    from hidrop.training import make_dataset, plain_training
    from hidrop_platform.evaluate import build_model
    from hidrop_platform.train import training_samples

    t = cfg.train
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        vlm = build_model(cfg, device="cpu")
        data = make_dataset(vlm, training_samples(cfg, vlm.grid), template=t.template, max_length=t.max_length)
        loop = plain_training(
            vlm, cfg.main_schedule, data, steps=total, stage=t.stage, lora=t.lora, micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum, lr=t.lr, lr_schedule=t.lr_schedule, warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay, grad_clip=t.grad_clip, budget_weight=t.budget_weight, seed=cfg.seed,
        )
        return [info["seconds"] for info in loop]
    finally:
        torch.set_num_threads(previous)
