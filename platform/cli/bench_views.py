"""What the `hidrop bench` commands print: per-method timings with their ratios to vanilla, Ray Train +
DeepSpeed's overhead over a plain loop, and exhaustive against multi-fidelity search. Printed on
views.out, looked up at each call so that a test's console is used."""

from __future__ import annotations

from rich.table import Table

import hidrop_platform.cli.views as views
from hidrop.evaluation.uncertainty import format_interval

# per `hidrop bench` kind: (column title, result key, format; a trailing x or % is printed after the number)
_METHOD_BENCH_COLUMNS = {
    "prefill": [
        ("latency ms", "latency_ms", ".1f"),
        ("speed-up", "speedup_vs_vanilla", ".2fx"),
        ("FLOPs ratio", "flops_ratio_vs_vanilla", ".2fx"),
        ("scoring % of vanilla", "scoring_overhead_pct_of_vanilla", ".1f%"),
        ("TFLOPs/sample", "model_tflops_per_sample", ".4g"),
    ],
    "generate": [
        ("total ms", "latency_ms", ".1f"),
        ("speed-up", "speedup_vs_vanilla", ".2fx"),
        ("first token ms", "time_to_first_token_ms", ".1f"),
        ("decode ms/token", "decode_ms_per_token", ".2f"),
        ("decode speed-up", "decode_speedup_vs_vanilla", ".2fx"),
        ("tokens/s", "tokens_per_s", ".1f"),
        ("KV cache MiB", "kv_cache_mib", ".1f"),
    ],
    "train": [
        ("step ms", "latency_ms", ".1f"),
        ("speed-up", "speedup_vs_vanilla", ".2fx"),
        ("FLOPs ratio", "flops_ratio_vs_vanilla", ".2fx"),
        ("samples/s", "throughput_samples_s", ".2f"),
        ("train TFLOPs/sample", "train_tflops_per_sample", ".4g"),
    ],
}


def print_method_bench(kind: str, result: dict) -> None:
    """`hidrop bench prefill|generate|train`: every method's timings and its ratios to vanilla."""
    m, seq = result["model"], result["sequence"]
    what = {
        "prefill": "Prefill",
        "generate": f"Generation of {result.get('new_tokens')} tokens",
        "train": "Training step",
    }[kind]
    table = Table(
        title=f"{what} on {result['device']} ({result['dtype']}, batch {result['batch_size']}, "
        f"{seq['vision_tokens']} vision + {seq['text_tokens']} text tokens, "
        f"{m['num_layers']} layers x {m['hidden_size']}, median of {result['repeats']})"
    )
    columns = list(_METHOD_BENCH_COLUMNS[kind])
    if any(r.get("peak_memory_gib") is not None for r in result["methods"]):
        columns.append(("peak GiB", "peak_memory_gib", ".2f"))
    table.add_column("method")
    table.add_column("avg vis tokens", justify="right")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for r in result["methods"]:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            suffix = fmt[-1] if fmt[-1] in "x%" else ""
            cells.append("-" if value is None else f"{value:{fmt.rstrip('x%')}}{suffix}")
        table.add_row(r["name"], f"{r['avg_vision_tokens']:.1f}", *cells)
    views.out.print(table)


def print_overhead_bench(result: dict) -> None:
    """`hidrop bench overhead`: Ray Train + DeepSpeed's step time against the plain loop's."""
    zero = result["zero_optimization"]
    table = Table(
        title=f"Training step, {result['experiment']} (batch {result['micro_batch_size']} x accum "
        f"{result['grad_accum']}, ZeRO-{zero['stage']}, {result['threads']} thread(s), "
        f"median of {result['steps_timed']} alternating steps)"
    )
    for col in ("path", "step ms", "ratio"):
        table.add_column(col, justify="left" if col == "path" else "right")
    table.add_row("plain loop", f"{result['plain_step_s'] * 1000:.1f}", "1.00x")
    low, high = result["ratio_quartiles"]
    table.add_row(
        "Ray Train + DeepSpeed", f"{result['ray_deepspeed_step_s'] * 1000:.1f}", f"{result['overhead_ratio']:.2f}x"
    )
    views.out.print(table)
    views.out.print(
        f"overhead {result['overhead_ms']:+.1f} ms per step; per-step ratios, middle half: {low:.2f}x-{high:.2f}x; "
        f"goal: {result['goal']}"
    )
    first = result["first_loss"]
    views.out.print(
        f"first-step loss: plain {first['plain']:.5f}, Ray + DeepSpeed {first['ray_deepspeed']:.5f} (same work)"
    )


def print_search_bench(result: dict) -> None:
    """`hidrop bench search`: exhaustive vs multi-fidelity search, their cost ratio and the verdict."""
    ex, mf = result["exhaustive"], result["multi_fidelity"]
    questions = ", ".join(f"{b} {n}" for b, n in result["search_questions"].items())
    table = Table(
        title=f"Search cost and quality: {result['candidates']} candidates on {questions} questions; "
        f"{result['rungs']} rungs x{result['factor']}, {result['promotion']} promotion"
    )
    columns = ("search", "questions", "passes", "wall s", "front", "best under budget", "confirmed [95% CI]", "HV")
    for col in (*columns, "HV above blind"):
        table.add_column(col, justify="left" if col in ("search", "best under budget") else "right")
    for name, side in (("exhaustive", ex), ("multi-fidelity", mf)):
        best = side["best_confirmed"]
        table.add_row(
            name,
            str(side["questions_run"]),
            str(side["batches_run"]),
            f"{side['wall_s']:.1f}",
            str(len(side["front"])),
            side["best_under_budget"] or "-",
            "-" if not best else format_interval(best[0], None if None in best[1:] else best[1:]),
            f"{side['hypervolume_confirmed']:.3g}",
            f"{side['hypervolume_confirmed_above_blind']:.3g}",
        )
    ratio = result["cost_ratio"]
    table.add_row(
        "ratio", f"{ratio['questions_run']:.2f}x", f"{ratio['batches_run']:.2f}x", f"{ratio['wall_s']:.2f}x", *[""] * 5
    )
    views.out.print(table)
    held = ", ".join(f"{b} {n}" for b, n in result["confirm_questions"].items())
    views.out.print(
        f"budget {result['budget_vision_tflops']:.4g} vision TFLOPs; held-out questions {held} "
        f"(overlap with the search: {result['confirm_overlap']}); multi-fidelity stopped {mf['stopped']} of "
        f"{result['candidates']}; reference pass (shared, not counted): {result['reference']['questions_run']} "
        f"questions, {result['reference']['wall_s']:.1f} s"
    )
    views.out.print(result["verdict"])
    if "orders" in result:
        o = result["orders"]
        q, loss = o["questions_ratio"], o["loss_above_blind"]
        views.out.print(
            f"over {o['n']} rung orders: questions {q['mean']:.2f}x (range {q['min']:.2f}-{q['max']:.2f}); "
            f"confirmed front loss above blind {loss['mean']:+.1f} (range {loss['min']:+.1f} to {loss['max']:+.1f}), "
            f"significant in {o['significant_loss']} of {o['n']}, within exhaustive's interval in "
            f"{o['within_exhaustive_interval']} of {o['n']}"
        )
    for n in result["notes"]:
        views.out.print(f"[yellow]note:[/] {n}")
