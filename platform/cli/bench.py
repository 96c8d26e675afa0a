"""`hidrop bench prefill|generate|train|overhead|search`: speed benchmarks whose ratios are measured in
one run.

Each command imports its benchmark inside the command: torch, Ray and DeepSpeed take seconds to import,
and `hidrop --help` or a one-line config error must not wait for them."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

import hidrop_platform.cli.bench_views as bench_views
import hidrop_platform.cli.progress as progress
import hidrop_platform.cli.views as views
from hidrop_platform.cli.options import AsJson, OptionError, load_experiment, load_experiment_and_data

# the arguments the three method benchmarks share
Experiment = Annotated[str, typer.Argument(help="experiment YAML (model shape, bench section)")]
Overrides = Annotated[Optional[List[str]], typer.Argument(help="a.b=value overrides, e.g. bench.repeats=10")]
Device = Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if available)")]
Small = Annotated[
    Optional[bool],
    typer.Option("--small/--full", help="bench.cpu_shape instead of model.shape (default: small on CPU)"),
]


def _run_method_bench(kind: str, experiment: str, overrides, device, small, as_json: bool) -> None:
    """prefill / generate / train: every method on one random-weight model, a table of ratios to vanilla."""
    # lazy: torch and transformers
    from hidrop_platform.bench.methods import run_generate_bench, run_prefill_bench, run_train_step_bench

    run = {"prefill": run_prefill_bench, "generate": run_generate_bench, "train": run_train_step_bench}[kind]
    cfg = load_experiment(experiment, overrides)
    if device not in (None, "cpu") and not device.startswith("cuda"):
        raise OptionError(f"--device must be cpu or cuda, not {device!r}")
    if device and device.startswith("cuda"):
        import torch  # lazy, like the benchmark module above

        if not torch.cuda.is_available():
            raise OptionError("--device cuda: no CUDA device here")
    if as_json:
        views.print_json(run(cfg, device=device, small=small))
        return
    with progress.status(f"benchmarking {kind}...") as status:
        result = run(cfg, device=device, small=small, progress=lambda n: status.update(f"benchmarking {kind}: {n}"))
    bench_views.print_method_bench(kind, result)


def bench_prefill(
    experiment: Experiment,
    overrides: Overrides = None,
    device: Device = None,
    small: Small = None,
    as_json: AsJson = False,
):
    """Prefill latency of vanilla, FastV, PDrop and HiDrop on one random-weight model, with ratios."""
    _run_method_bench("prefill", experiment, overrides, device, small, as_json)


def bench_generate(
    experiment: Experiment,
    overrides: Overrides = None,
    device: Device = None,
    small: Small = None,
    as_json: AsJson = False,
):
    """Greedy generation (bench.new_tokens): first-token time, per-token decode, KV cache size, ratios."""
    _run_method_bench("generate", experiment, overrides, device, small, as_json)


def bench_train(
    experiment: Experiment,
    overrides: Overrides = None,
    device: Device = None,
    small: Small = None,
    as_json: AsJson = False,
):
    """Training step (forward + backward, schedule active) per method on one random-weight model, with ratios."""
    _run_method_bench("train", experiment, overrides, device, small, as_json)


def bench_overhead(
    experiment: str = typer.Argument(
        ..., help="experiment YAML with a train section (e.g. experiments/tiny_train_smoke.yaml)"
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides"),
    steps: int = typer.Option(40, help="timed optimizer steps per path (after warm-up)"),
    warmup: int = typer.Option(5, help="untimed warm-up steps"),
    as_json: AsJson = False,
):
    """Step time of Ray Train + DeepSpeed (one worker) against a plain single-process loop, the two taking
    turns step by step; prints the median per-step ratio."""
    # lazy: Ray, DeepSpeed and torch
    from hidrop_platform.bench.overhead import run_overhead_bench

    cfg = load_experiment(experiment, overrides)
    if steps < 1 or warmup < 0:
        raise OptionError("--steps must be at least 1 and --warmup at least 0")
    with progress.status("timing Ray Train + DeepSpeed and the plain loop, taking turns step by step..."):
        result = run_overhead_bench(cfg, steps=steps, warmup=warmup)
    if as_json:
        views.print_json(result)
        return
    bench_views.print_overhead_bench(result)


def bench_search(
    experiment: str = typer.Argument(..., help="experiment YAML with a training-free tune section"),
    overrides: Optional[List[str]] = typer.Argument(None, help="a.b=value overrides, e.g. tune.fidelity.factor=2"),
    candidates: Optional[int] = typer.Option(
        None, help="random valid samples after the seeds (default: tune.num_samples)"
    ),
    budget: Optional[float] = typer.Option(None, help="vision-TFLOPs budget of the 'best' schedule (default: median)"),
    orders: int = typer.Option(
        1, min=1, help="also replay the rungs on N-1 reshuffled question orders (from the exhaustive records)"
    ),
    as_json: AsJson = False,
):
    """Exhaustive evaluation vs multi-fidelity search (tune.fidelity) on one fixed candidate set: questions,
    model passes and wall time of each, and what each finds, confirmed on held-out questions."""
    # lazy: Ray Tune, torch and transformers
    from hidrop_platform.bench.search import run_search_bench

    cfg, base = load_experiment_and_data(experiment, overrides)
    if cfg.tune.kind != "training_free":
        raise OptionError("bench search compares training-free searches; set tune.kind=training_free")
    with progress.status("search benchmark...") as status:
        result = run_search_bench(cfg, base, candidates, budget, progress=lambda m: status.update(m), orders=orders)
    if as_json:
        views.print_json(result)
        return
    bench_views.print_search_bench(result)
