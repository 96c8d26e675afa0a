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


import pytest  # noqa: E402


@pytest.mark.parametrize("kind", ["generate", "train"])
def test_bench_generate_and_train_run_every_method(tmp_path, kind):
    path = tmp_path / "bench.yaml"
    path.write_text(TINY + "  new_tokens: 4\n")
    result = CliRunner().invoke(app, ["bench", kind, str(path), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    names = [m["name"] for m in data["methods"]]
    assert names == ["vanilla", "fastv_k2_r50", "pdrop", "hidrop_tok64"]
    vanilla, hidrop = data["methods"][0], data["methods"][-1]
    assert vanilla["speedup_vs_vanilla"] == 1.0 and all(m["latency_ms"] > 0 for m in data["methods"])
    if kind == "generate":
        assert data["new_tokens"] == 4
        # the cache holds what the schedule kept: HiDrop's layers keep far fewer vision tokens
        assert hidrop["kv_cache_mib"] < data["methods"][1]["kv_cache_mib"] < vanilla["kv_cache_mib"]
        assert all(m["time_to_first_token_ms"] > 0 for m in data["methods"])
    else:
        assert hidrop["train_tflops_per_sample"] < vanilla["train_tflops_per_sample"]
    human = CliRunner().invoke(app, ["bench", kind, str(path), "--device", "cpu"])
    assert human.exit_code == 0 and "hidrop_tok64" in human.output and "speed-up" in human.output


def test_training_forward_really_shortens_the_sequence():
    """Dropped tokens are removed from the hidden states the later decoder layers see (not masked): every
    layer's input width equals the text tokens plus the schedule's vision count for that layer."""
    import torch

    from hidrop.engine import ScheduledModel
    from hidrop.schedule import preset
    from hidrop_platform.bench.methods import _random_lm
    from hidrop_platform.config.loader import load_config_data, validate_config

    cfg = validate_config(load_config_data(_write(TINY)), "tiny")
    shape = cfg.bench.cpu_shape
    model = _random_lm(shape, torch.float32, "cpu", "sdpa").train()
    n_vis, text, batch = shape.num_vision_tokens, 12, 2
    ids = torch.randint(3, shape.vocab_size, (batch, n_vis + text))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5 : 5 + n_vis] = True
    vision = torch.randn(batch * n_vis, shape.hidden_size, requires_grad=True)
    widths: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: widths.append(
                (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape[1]
            ),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    for name in ("vanilla", "pdrop", "hidrop_tok64"):
        schedule = preset(name, shape.num_layers, n_vis)
        widths.clear()
        out = ScheduledModel(model, schedule)(ids, vision_embeds=vision, vision_mask=mask, labels=ids)
        out.loss.backward()
        assert widths == [text + n for n in schedule.tokens_per_layer()], name
    for h in hooks:
        h.remove()


def _write(text: str) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    f.write(text)
    f.close()
    return f.name
