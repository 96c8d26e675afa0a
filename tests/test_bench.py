"""Smoke test of the prefill benchmark command on a CI-sized shape (numbers are not asserted: timing is
measured by the command, never by tests; here we check it runs every method and reports ratios)."""
import json

from typer.testing import CliRunner

from hidrop_platform.cli import app

TINY = """
name: bench_smoke
schedule: {preset: fastv}  # the experiment's own schedule is benchmarked once, not twice
model:
  shape: {num_layers: 8, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
          num_key_value_heads: 2, vocab_size: 256, num_vision_tokens: 32, vision_encoder: null}
bench:
  warmup: 0
  repeats: 1
  text_tokens: 12
  cpu_batch_size: 2
  cpu_shape: {num_layers: 8, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
              num_key_value_heads: 2, vocab_size: 256, num_vision_tokens: 32, vision_encoder: null}
"""


def test_bench_prefill_runs_every_method(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(TINY)
    result = CliRunner().invoke(app, ["bench", "prefill", str(path), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = [m["name"] for m in data["methods"]]
    assert names == ["vanilla", "fastv_k2_r50", "pdrop", "hidrop_tok64"]
    vanilla = data["methods"][0]
    assert vanilla["speedup_vs_vanilla"] == 1.0 and vanilla["flops_ratio_vs_vanilla"] == 1.0
    for m in data["methods"][1:]:
        assert m["latency_ms"] > 0 and "scoring_overhead_pct_of_vanilla" in m
        assert m["model_tflops_per_sample"] < vanilla["model_tflops_per_sample"]
    human = CliRunner().invoke(app, ["bench", "prefill", str(path), "--device", "cpu"])
    assert human.exit_code == 0 and "hidrop_tok64" in human.output and "speed-up" in human.output
