"""`make gpu-check`: every GPU figure of the project in one prepared run, written to one JSON file.

On a CUDA machine (LLaVA-1.5-7B shape, bf16, batch 8, random weights):
  1. `pytest -m gpu`: FlashAttention-vs-SDPA parity and the CUDA parallel-vision test (FlashAttention
     proper needs the flash-attn package; without it the parity is checked against SDPA's own flash
     kernel, `torch.nn.attention.sdpa_kernel`, and labelled so);
  2. prefill, generation and training step of every `bench.methods` entry, ratios to vanilla in one run;
  3. the parallel-decoupling gain: HiDrop prefill from pixels with `parallel_vision` on and off, with a
     CLIP ViT-L/14-336-shaped encoder, median of repeats;
  4. generation throughput at a fixed memory budget: the largest batch each method fits in
     `--memory-gib`, and its tokens/s.
`--device cpu --tiny` runs the same code on a tiny shape: the dry run CI executes.

Imports torch, transformers, pydantic, yaml and hidrop only (no ray, mlflow, deepspeed, typer): the GPU
machine has no registry, so it runs from the tree plus carried wheels (README: "GPU figures").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from hidrop.engine import ScheduledModel
from hidrop.models import DTYPES, llama_config
from hidrop.schedule import preset
from hidrop.tiny import tiny_llama
from hidrop_platform.bench.methods import (
    _cache_mib,
    _random_lm,
    _round_robin,
    run_generate_bench,
    run_prefill_bench,
    run_train_step_bench,
)
from hidrop_platform.config.loader import load_config_data, validate_config, with_overrides

ROOT = Path(__file__).resolve().parents[2]  # the checkout: platform/bench/ is two folders down
DEFAULT_EXPERIMENT = ROOT / "experiments" / "llava15_7b_hidrop.yaml"
TINY_SHAPE = {  # the dry run: every code path, a model of a few hundred thousand weights
    "num_layers": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "num_vision_tokens": 64,
    "vision_encoder": None,
}


def _load(experiment: Path, tiny: bool):
    data = load_config_data(experiment)
    if tiny:
        tiny_bench = {"bench.cpu_shape": TINY_SHAPE, "bench.repeats": 2, "bench.warmup": 1, "bench.new_tokens": 4}
        data = with_overrides(data, {**tiny_bench, "bench.cpu_batch_size": 2})
    return validate_config(data, str(experiment))


# ---- 1. the GPU tests ------------------------------------------------------------------------------
# the test files holding `gpu` tests, named so that pytest never collects the platform's tests (they
# import ray and mlflow, which the GPU machine lacks); tests/test_gpu_check.py keeps the list complete
GPU_TEST_FILES = ("tests/test_engine.py",)


def run_gpu_tests(timeout_s: int = 240) -> dict:
    """`pytest -m gpu` in a child process; its counts and, per test, passed / failed / skipped."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += [str(ROOT / f) for f in GPU_TEST_FILES]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    outcomes = {}
    for line in output.splitlines():
        m = re.match(r"^(PASSED|FAILED|SKIPPED|ERROR)\s+(?:\[\d+\]\s+)?(\S+)(?:\s+-\s+(.*))?", line)
        if m:
            outcomes[m.group(2)] = {"outcome": m.group(1).lower(), "reason": (m.group(3) or "").strip()}
    summary = re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", output)
    flash = _flash_attn_available()
    return {
        "exit_code": code,
        "counts": {kind: int(n) for n, kind in summary},
        "tests": outcomes,
        "flash_attn_installed": flash,
        "flash_parity_against": "flash-attn (flash_attention_2)" if flash else "not run: flash-attn is not installed",
        "sdpa_flash_parity": None,  # filled by run_sdpa_flash_parity
        "wall_s": time.perf_counter() - start,
        "output_tail": output[-3000:],
    }


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def run_sdpa_flash_parity(device: str, tiny: bool) -> dict:
    """Without flash-attn: the engine under SDPA restricted to its FlashAttention kernel vs SDPA's math
    kernel, same fp16 weights, an unpadded batch under HiDrop (SDPA's flash kernel takes no explicit
    mask, so only the causal path reaches it); max |logit difference|. What this checks is SDPA's flash
    kernel inside the engine's pruned stages, not the flash-attn package nor padded batches."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = tiny_llama(num_layers=8, hidden_size=128, num_heads=4, num_kv_heads=2).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    n_vis, text = 16, 12
    ids = torch.randint(3, 120, (3, n_vis + text), generator=g).to(device)
    mask = torch.ones_like(ids)  # no padding: with a padding mask SDPA would refuse its flash kernel
    vision = torch.zeros_like(ids, dtype=torch.bool)
    vision[:, 4 : 4 + n_vis] = True
    feats = torch.randn(int(vision.sum()), 128, generator=g).to(device, dtype)
    sm = ScheduledModel(model, preset("hidrop_tok64", 8, n_vis))
    out = {}
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION if device.startswith("cuda") else None}
    for name, backend in backends.items():
        if backend is None:
            out[name] = None
            continue
        try:
            with torch.no_grad(), sdpa_kernel(backend):
                out[name] = sm(ids, mask, vision_embeds=feats, vision_mask=vision).logits.float()
        except RuntimeError as e:  # the flash kernel refuses this mask or dtype
            return {"ran": False, "reason": str(e).splitlines()[0][:300]}
    if out["flash"] is None:
        return {"ran": False, "reason": "SDPA's flash kernel needs CUDA"}
    gap = (out["flash"] - out["math"]).abs().max().item()
    return {
        "ran": True,
        "max_abs_logit_diff": gap,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": "unpadded",
        "ok": gap < 2e-2,
    }


# ---- 3. the parallel-decoupling gain --------------------------------------------------------------
def _llava(shape, device: str, dtype, tiny: bool):
    """A random LLaVA of the experiment's LM shape with a CLIP ViT-L/14-336-shaped encoder (tiny: the
    tiny CLIP)."""
    if tiny:
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        )
    else:  # CLIP ViT-L/14 at 336 px: 24 layers, 1024 wide, 576 patches
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
    text = llama_config(shape)
    tokens = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=shape.vocab_size - 1,
        image_seq_length=tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval(), tokens


def run_decoupling_bench(cfg, device: str, tiny: bool, progress=None) -> dict:
    """HiDrop prefill from pixels, `parallel_vision` on (the encoder on a side stream beside the text-only
    layers before injection) and off (encode first), round-robin, median of repeats."""
    b = cfg.bench
    shape = b.cpu_shape if tiny else cfg.model.shape
    dtype = torch.float32 if device == "cpu" else DTYPES.get(b.dtype, torch.float32)
    batch = b.cpu_batch_size if tiny else b.batch_size
    torch.manual_seed(cfg.seed)
    model, n_vis = _llava(shape, device, dtype, tiny)
    schedule = preset("hidrop_tok64", shape.num_layers, n_vis)
    text = b.text_tokens
    ids = torch.randint(3, shape.vocab_size - 2, (batch, n_vis + text)).to(device)
    ids[:, 5 : 5 + n_vis] = model.config.image_token_id
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size).to(device, dtype)
    calls = []
    with torch.no_grad():
        for parallel in (True, False):
            sm = ScheduledModel(model, schedule, parallel_vision=parallel)
            calls.append((f"parallel_vision={parallel}", lambda sm=sm: sm(ids, pixel_values=pixels, logits_to_keep=1)))
        times = _round_robin(calls, b.warmup, b.repeats, device, progress)
    on, off = (statistics.median(times[name]) for name, _ in calls)
    return {
        "schedule": schedule.describe(),
        "inject_layer": schedule.inject_layer,
        "vision_encoder": "tiny CLIP" if tiny else "CLIP ViT-L/14-336 shape (random weights)",
        "batch_size": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "parallel_ms": 1000 * on,
        "sequential_ms": 1000 * off,
        "gain_ms": 1000 * (off - on),
        "gain_pct": 100 * (off - on) / off,
        "parallel_ms_all": [1000 * t for t in times[calls[0][0]]],
        "sequential_ms_all": [1000 * t for t in times[calls[1][0]]],
    }


# ---- 4. throughput at a fixed memory budget --------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], start: int = 1, most: int = 4096) -> int:
    """The largest batch b in 1..most with fits(b), assuming fits is monotone: double, then bisect.
    0 when not even `start` fits."""
    if not fits(start):
        return 0
    lo, hi = start, start
    while hi < most and fits(min(2 * hi, most)):
        lo = hi = min(2 * hi, most)
        if hi == most:
            return most
    hi = min(2 * hi, most)  # fits(lo) holds, fits(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run_memory_budget_bench(cfg, device: str, tiny: bool, memory_gib: float, progress=None) -> dict:
    """Per method: the largest generation batch whose peak memory stays under `memory_gib` (CUDA: the
    allocator's measured peak, an OOM counting as not fitting; the CPU dry run: weights + KV cache from
    the cache's own size), then that batch's tokens/s, median of repeats."""
    b = cfg.bench
    shape = b.cpu_shape if tiny else cfg.model.shape
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(cfg.seed)
    model = _random_lm(shape, dtype, device, cfg.model.attn_implementation)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    n_vis, text, new = shape.num_vision_tokens, b.text_tokens, b.new_tokens
    cuda = device.startswith("cuda")
    rows = []
    for name in b.methods:
        schedule = preset(name, shape.num_layers, n_vis)
        sm = ScheduledModel(model, schedule)

        def inputs(batch: int):
            ids = torch.randint(3, shape.vocab_size, (batch, n_vis + text)).to(device)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, 5 : 5 + n_vis] = True
            vision = torch.randn(batch * n_vis, shape.hidden_size).to(device, dtype)
            return ids, vision, mask

        def run(batch: int, return_cache: bool = False):
            ids, vision, mask = inputs(batch)
            with torch.no_grad():
                return sm.generate(
                    ids, vision_embeds=vision, vision_mask=mask, max_new_tokens=new, return_cache=return_cache
                )

        def fits(batch: int) -> bool:
            if progress:
                progress(f"{name}: batch {batch}")
            if not cuda:
                return weights_gib + _cache_mib(run(batch, return_cache=True)[1]) / 1024 <= memory_gib
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                run(batch)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                return False
            return torch.cuda.max_memory_allocated() / 2**30 <= memory_gib

        batch = largest_fitting(fits, most=64 if tiny else 4096)
        row = {"name": name, "avg_vision_tokens": schedule.avg_tokens(), "largest_batch": batch}
        if batch:
            times = _round_robin([(name, lambda batch=batch: run(batch))], b.warmup, b.repeats, device)
            median = statistics.median(times[name])
            row.update(tokens_per_s=batch * new / median, latency_ms=1000 * median)
        rows.append(row)
    base = next((r for r in rows if r["name"] == "vanilla"), rows[0])
    for r in rows:
        if base.get("tokens_per_s") and r.get("tokens_per_s"):
            r["throughput_vs_vanilla"] = r["tokens_per_s"] / base["tokens_per_s"]
    return {"memory_gib": memory_gib, "weights_gib": weights_gib, "new_tokens": new, "methods": rows}


# ---- the whole check --------------------------------------------------------------------------------
GOALS = {"prefill_speedup": 4.0, "train_speedup": 2.0}  # HiDrop Tok64 vs vanilla at batch 8 (issue's goals)


def run_gpu_check(
    experiment: Path = DEFAULT_EXPERIMENT,
    device: Optional[str] = None,
    tiny: bool = False,
    memory_gib: float = 40.0,
    tests: bool = True,
    say: Callable[[str], None] = lambda msg: None,
) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _load(Path(experiment), tiny)
    start = time.perf_counter()
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "tiny": tiny,
        "experiment": str(experiment),
    }
    if tests:
        say("pytest -m gpu")
        result["gpu_tests"] = run_gpu_tests()
        result["gpu_tests"]["sdpa_flash_parity"] = run_sdpa_flash_parity(device, tiny)
    small = True if tiny else False
    for key, bench in (
        ("prefill", run_prefill_bench),
        ("generate", run_generate_bench),
        ("train", run_train_step_bench),
    ):
        say(f"bench {key}")
        result[key] = bench(cfg, device=device, small=small, progress=lambda msg, key=key: say(f"bench {key}: {msg}"))
    say("parallel decoupling")
    result["decoupling"] = run_decoupling_bench(cfg, device, tiny, progress=lambda msg: say(f"decoupling: {msg}"))
    say("throughput at a fixed memory budget")
    budget = memory_gib if not tiny else 0.002  # tiny: a few samples' KV cache, so the search bisects
    result["memory_budget"] = run_memory_budget_bench(cfg, device, tiny, budget, progress=lambda m: say(f"memory: {m}"))
    result["goals"] = _goals(result)
    result["wall_s"] = time.perf_counter() - start
    return result


def _goals(result: dict) -> dict:
    def speedup(section: str) -> Optional[float]:
        row = next((r for r in result[section]["methods"] if r["name"].startswith("hidrop_tok64")), None)
        return row["speedup_vs_vanilla"] if row else None

    prefill, train = speedup("prefill"), speedup("train")
    return {
        "hidrop_tok64_prefill_speedup": prefill,
        "prefill_goal_met": None if prefill is None else prefill >= GOALS["prefill_speedup"],
        "hidrop_tok64_train_speedup": train,
        "train_goal_met": None if train is None else train >= GOALS["train_speedup"],
        "decoupling_gain_ms": result["decoupling"]["gain_ms"],
        # paired by round: met when even the lower quartile of the per-round gains is above 0, not on a
        # median difference that noise alone could make positive
        "decoupling_gain_ms_lower_quartile": _lower_quartile_gain(result["decoupling"]),
        "decoupling_goal_met": _lower_quartile_gain(result["decoupling"]) > 0,
    }


def _lower_quartile_gain(d: dict) -> float:
    gains = sorted(s - p for p, s in zip(d["parallel_ms_all"], d["sequential_ms_all"]))
    return float(statistics.quantiles(gains, n=4)[0]) if len(gains) > 1 else float(gains[0])


def table(result: dict) -> str:
    """The short table printed after the JSON is written."""
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, transformers {result['transformers']})"]
    if "gpu_tests" in result:
        t = result["gpu_tests"]
        lines.append(f"pytest -m gpu: {t['counts']} ({t['flash_parity_against']})")
        p = t["sdpa_flash_parity"]
        lines.append(
            f"SDPA flash kernel vs math: max |logit diff| {p['max_abs_logit_diff']:.2e}"
            if p.get("ran")
            else f"SDPA flash parity: not run ({p.get('reason')})"
        )
    lines.append(
        f"{'method':<16}{'prefill ms':>12}{'x':>7}{'TTFT ms':>10}{'decode ms/tok':>15}{'train ms':>10}{'x':>7}"
    )
    by = {k: {r["name"]: r for r in result[k]["methods"]} for k in ("prefill", "generate", "train")}
    for name, p in by["prefill"].items():
        g, t = by["generate"].get(name, {}), by["train"].get(name, {})
        ttft, decode = g.get("time_to_first_token_ms", 0), g.get("decode_ms_per_token", 0)
        lines.append(
            f"{name:<16}{p['latency_ms']:>12.1f}{p['speedup_vs_vanilla']:>7.2f}{ttft:>10.1f}{decode:>15.2f}"
            f"{t.get('latency_ms', 0):>10.1f}{t.get('speedup_vs_vanilla', 0):>7.2f}"
        )
    d = result["decoupling"]
    lines.append(
        f"parallel decoupling: {d['parallel_ms']:.1f} ms vs {d['sequential_ms']:.1f} ms sequential "
        f"(gain {d['gain_ms']:+.1f} ms, {d['gain_pct']:+.1f}%)"
    )
    m = result["memory_budget"]
    lines.append(
        f"at {m['memory_gib']:g} GiB: "
        + ", ".join(
            f"{r['name']} batch {r['largest_batch']} {r.get('tokens_per_s', 0):.0f} tok/s" for r in m["methods"]
        )
    )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT))
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape: the dry run")
    ap.add_argument("--memory-gib", type=float, default=40.0)
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    result = run_gpu_check(
        Path(args.experiment),
        args.device,
        args.tiny,
        args.memory_gib,
        tests=not args.no_tests,
        say=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True),
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"written: {args.out}")
    tests = result.get("gpu_tests")
    if tests is not None and tests["exit_code"] not in (0, 5):  # 5: pytest collected nothing to run
        print(f"error: pytest -m gpu exited {tests['exit_code']}: see gpu_tests in {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
