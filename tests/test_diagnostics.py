"""Layer diagnostics: the curves against stock transformers (hidden states and eager attention), their
shapes and ranges, extremum/plateau selection on constructed curves, the proposal on constructed curves,
determinism, and `hidrop analyze` end to end on a tiny model (YAML that validates, plots, MLflow run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from hidrop.data import Collator, encode_sample, get_template
from hidrop.diagnostics import (
    _batch_stats,
    _ilvas,
    layer_curves,
    local_extrema,
    onset,
    plateau_start,
    propose,
    reference_image,
    run_sweeps,
)
from hidrop.evaluation.registry import get_benchmark
from hidrop.tiny import tiny_vlm
from hidrop_platform.config import load_config


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=0)


@pytest.fixture(scope="module")
def samples():
    return get_benchmark("easy_vqa", limit=6, seed=0).samples()


def _stock(vlm, samples, images):
    """Stock transformers on the same inputs: every hidden state and eager attention."""
    tok, template = vlm.tokenizer, get_template(vlm.template)
    kw = dict(image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_vision_tokens, for_generation=True)
    batch = Collator.for_tokenizer(tok, padding_side="left")([encode_sample(s, tok, template, **kw) for s in samples])
    ids, am = batch["input_ids"], batch["attention_mask"]
    vision = ids == vlm.image_token_id
    embeds = vlm.lm.get_input_embeddings()(ids).clone()
    embeds[vision] = vlm.vision_embeds(torch.stack([vlm.image_processor(im) for im in images])).reshape(
        -1, embeds.shape[-1]
    )
    pos = (am.cumsum(1) - 1).clamp(min=0)
    vlm.lm.set_attn_implementation("eager")
    try:
        out = vlm.lm(
            inputs_embeds=embeds, attention_mask=am, position_ids=pos, output_hidden_states=True, output_attentions=True
        )
    finally:
        vlm.lm.set_attn_implementation("sdpa")
    return out, vision, am


@torch.no_grad()
def test_curves_match_stock_hidden_states_and_eager_attention(vlm, samples):
    chunk = samples[:3]  # different prompt lengths: left padding is exercised
    refs = [reference_image(s.load_image()) for s in chunk]
    intra, cross, attention = _batch_stats(vlm, chunk, refs)
    own, vision, am = _stock(vlm, chunk, [s.load_image() for s in chunk])
    ref, _, _ = _stock(vlm, chunk, refs)
    L = vlm.num_layers
    cos = torch.nn.functional.cosine_similarity
    for b in range(len(chunk)):
        v = vision[b]
        instruction = am[b].bool() & ~v & (v.long().cumsum(0) >= vlm.num_vision_tokens)
        for l in range(L - 1):  # the last stock hidden state has the final norm applied
            expect_intra = cos(own.hidden_states[l][b, v], own.hidden_states[l + 1][b, v], dim=-1).mean()
            assert float(intra[b, l]) == pytest.approx(float(expect_intra), abs=1e-4)
            expect_cross = (
                1
                - cos(own.hidden_states[l + 1][b, instruction], ref.hidden_states[l + 1][b, instruction], dim=-1).mean()
            )
            assert float(cross[b, l]) == pytest.approx(float(expect_cross), abs=1e-4)
        for l in range(L):  # the scoring pass == layer l's own attention row of the last prompt token
            expect = own.attentions[l][b, :, -1][:, v]
            torch.testing.assert_close(attention[b, l], expect.float(), atol=1e-5, rtol=1e-4)


def test_ilvas_against_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    att = torch.rand(2, 6, 3, 10, generator=g).softmax(-1)  # (B, L, H, N)
    got = _ilvas(att, k=4, n=2)
    for b in range(2):
        for l in range(4):
            mean_heads = att[b, l].mean(0)
            top = sorted(range(10), key=lambda j: -float(mean_heads[j]))[:4]
            sims = []
            for h in range(3):
                a = torch.tensor([float(att[b, l, h, j]) for j in top], dtype=torch.float64)
                c = torch.tensor([float(att[b, l + 2, h, j]) for j in top], dtype=torch.float64)
                sims.append(float(a @ c / (a.norm() * c.norm())))
            assert float(got[b, l]) == pytest.approx(sum(sims) / 3, abs=1e-9)


def test_curve_shapes_ranges_and_determinism(vlm, samples):
    a = layer_curves(vlm, samples, ilvas_k=[3, 8, 500], ilvas_n=[2, 3, 99], batch_size=4)
    b = layer_curves(vlm, samples, ilvas_k=[3, 8, 500], ilvas_n=[2, 3, 99], batch_size=4)
    assert a == b
    L = vlm.num_layers
    assert a["ilvas_k"] == [3, 8, 16] and a["ilvas_n"] == [2, 3]  # K clipped to the token count, n < L
    assert len(a["s_intra"]) == len(a["s_cross"]) == len(a["ilvas_mean"]) == L
    assert all(-1 <= x <= 1 for x in a["s_intra"]) and all(0 <= x <= 2 for x in a["s_cross"])
    for key, values in a["ilvas"].items():
        n = int(key.split("_n")[1])
        assert len(values) == L - n and all(-1e-9 <= x <= 1 + 1e-9 for x in values)  # attention is non-negative
    assert a["ilvas_mean"][-2:] == [None, None] and a["ilvas_mean"][0] is not None
    shuffled = layer_curves(vlm, samples, reference="shuffled", batch_size=4)
    assert shuffled["s_cross"] != a["s_cross"] and shuffled["s_intra"] == pytest.approx(a["s_intra"])


def test_local_extrema_plateaus_and_onsets_on_constructed_curves():
    curve = [0.1, 0.5, 0.2, 0.2, 0.9, 0.9, 0.3, 0.4, 0.35, 0.8]
    assert local_extrema(curve, 1, 10, "max") == [5, 10, 2, 8]  # by prominence; the flat top 5-6 counts once
    assert local_extrema(curve, 2, 9, "max") == [5, 2, 8]  # window edges: L2 falls away inside the window
    assert local_extrema(curve, 1, 10, "min") == [1, 3, 7, 9]
    assert local_extrema([1.0] * 6, 1, 6) == [] and local_extrema([1.0, 1.0 + 1e-6, 1.0], 1, 3) == []
    assert plateau_start([10, 30, 58, 61, 59.5, 60], 60, 1.0) == 3
    assert plateau_start([10, 30, 58], 60, 1.0) == 3  # never reaches it
    assert onset([0.0, 0.01, 0.05, 0.2, 0.5], 0.1) == 3 and onset([0.0, 0.0], 0.1) == 3


def _constructed(L=24):
    s_intra = [0.95] * L
    s_intra[5] = 0.6  # dip at L6
    s_cross = [0.0] * 4 + [0.05 * (i + 1) for i in range(L - 4)]  # onset (10% of max 1.0) at L6
    ilvas = [0.5] * L
    for l in (9, 12, 15, 30):
        if l <= L:
            ilvas[l - 1] = 0.8 + 0.01 * l
    curves = {"num_layers": L, "num_vision_tokens": 100, "s_intra": s_intra, "s_cross": s_cross, "ilvas_mean": ilvas}
    layers = list(range(2, L + 1))
    sweeps = {
        "layers": layers,
        "exit": [10 + 3 * l if l < 19 else 70 for l in layers],
        "inject": [70] * len(layers),
        "all_tokens": 70.0,
        "blind": 10.0,
    }
    return curves, sweeps


def test_proposal_from_constructed_curves():
    curves, sweeps = _constructed()
    p = propose(curves, sweeps, avg_tokens=25.0, stages=4, keep_decay=0.5)
    f = p["schedule_fields"]
    assert f["inject_layer"] == 6 and f["exit_layer"] == 19 and f["drop_layers"] == [9, 12, 15]
    assert abs(p["avg_tokens"] - 25.0) < 0.5 and set(p["why"]) == {"inject_layer", "exit_layer", "drop_layers", "keeps"}
    # a budget the window cannot reach: the nearest reachable average, and the reason says so
    p = propose(curves, sweeps, avg_tokens=0.5, stages=4)
    assert "unreachable" in p["why"]["keeps"] and p["avg_tokens"] > 0.5
    # an injection sweep that already loses points at L3: the proposal injects no later than L2
    strict = dict(sweeps, inject=[70.0, 50.0] + [40.0] * (len(sweeps["layers"]) - 2))
    p = propose(curves, strict, avg_tokens=25.0)
    assert p["schedule_fields"]["inject_layer"] == 2 and "injection sweep" in p["why"]["inject_layer"]
    # no sweep: vision stays to the end
    assert propose(curves, None, avg_tokens=12.0)["schedule_fields"].get("exit_layer") is None


def test_sweeps_are_the_engine_evaluated_at_each_layer(vlm):
    bench = get_benchmark("easy_vqa", limit=8, seed=0)
    sw = run_sweeps(vlm, [bench], stride=3)
    assert sw["layers"] == [2, 5, 8] and len(sw["exit"]) == len(sw["inject"]) == 3
    assert sw["exit"][-1] != None and 0 <= sw["blind"] <= 100  # noqa: E711
    from hidrop.evaluation.harness import evaluate
    from hidrop.schedule import Schedule

    direct = evaluate(
        vlm, [Schedule(num_layers=8, num_vision_tokens=16, exit_layer=5, name="x")], [bench], baselines=[]
    )
    assert sw["exit"][1] == pytest.approx(direct.methods[1].benchmarks["easy_vqa"].score)


def test_analyze_cli_writes_a_valid_yaml_plots_and_one_mlflow_run(tmp_path):
    exp = tmp_path / "an.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_analyze",
                "model": {"kind": "tiny_llava"},
                "eval": {"benchmarks": [{"name": "easy_vqa", "limit": 8}]},
                "analyze": {
                    "samples": 6,
                    "sweep_samples": 6,
                    "ilvas_k": [3, 8],
                    "ilvas_n": [2],
                    "output": str(tmp_path / "out"),
                },
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", "analyze", str(exp), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    out = tmp_path / "out" / "tiny_analyze"
    assert {p.name for p in out.iterdir()} >= {"proposed.yaml", "analysis.json", "curves.png"}
    cfg = load_config(out / "proposed.yaml")
    assert cfg.main_schedule.model_dump(mode="json") == result["proposal"]["schedule"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny_analyze").experiment_id])
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "s_intra")) == 8
    # the proposal seeds a search as is
    from hidrop_platform.config import validate_config

    data = yaml.safe_load((out / "proposed.yaml").read_text())
    data["tune"] = {"seeds": ["vanilla", data["schedule"]]}
    validate_config(data)
    bad = subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", "analyze", str(exp), "analyze.reference=blue"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert bad.returncode == 2 and "analyze.reference" in bad.stderr and "Traceback" not in bad.stderr
