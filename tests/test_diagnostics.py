"""Layer diagnostics: the curves against stock transformers (hidden states and eager attention), their
shapes and ranges, extremum/plateau selection on constructed curves, the proposal on constructed curves,
determinism, and `hidrop analyze` end to end on a tiny model (YAML that validates, plots, MLflow run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from hidrop.data import Collator, encode_sample, get_template
from hidrop.diagnostics import (
    _batch_stats,
    _ilvas,
    _window_attention,
    layer_curves,
    local_extrema,
    onset,
    plateau_start,
    propose,
    questions_to_resolve,
    reference_image,
    run_sweeps,
    significant_maxima,
    sweep_statistics,
    verdict,
)
from hidrop.evaluation.registry import get_benchmark
from hidrop.evaluation.results import QuestionRecord
from hidrop.tiny import tiny_vlm
from hidrop_platform.config.loader import load_config


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
    """The paper's ILVAS: per top-K token, the cosine of its head-wise attention vector (one entry per head)
    between layers l and l + n, averaged over the K tokens; undefined where a layer has no vision."""
    g = torch.Generator().manual_seed(0)
    att = torch.rand(2, 6, 3, 10, generator=g).softmax(-1)  # (B, L, H, N)
    got = _ilvas(att, k=4, n=2)
    for b in range(2):
        for l in range(4):
            mean_heads = att[b, l].mean(0)
            top = sorted(range(10), key=lambda j: -float(mean_heads[j]))[:4]
            sims = []
            for j in top:
                a = torch.tensor([float(att[b, l, h, j]) for h in range(3)], dtype=torch.float64)
                c = torch.tensor([float(att[b, l + 2, h, j]) for h in range(3)], dtype=torch.float64)
                sims.append(float(a @ c / (a.norm() * c.norm())))
            assert float(got[b, l]) == pytest.approx(sum(sims) / 4, abs=1e-9)
    # the head-wise cosine of one token: hand-computed on two heads
    two = torch.zeros(1, 2, 2, 1)
    two[0, 0, :, 0] = torch.tensor([0.6, 0.8])
    two[0, 1, :, 0] = torch.tensor([0.8, 0.6])
    assert float(_ilvas(two, k=1, n=1)[0, 0]) == pytest.approx(0.96)
    windowed = att.clone()
    windowed[:, :2] = float("nan")  # no vision before layer 3 (late injection)
    assert torch.isnan(_ilvas(windowed, k=4, n=2)[:, :2]).all() and not torch.isnan(_ilvas(windowed, 4, 2)[:, 2:]).any()


@torch.no_grad()
def test_window_attention_is_the_late_injection_models(vlm, samples):
    """Against stock transformers run the way late injection works: the text alone (original positions)
    through the layers before the injection layer, then the raw projector outputs joining at their places
    and the remaining stock layers, eager attention, on the whole prompt."""
    chunk, inject = samples[:3], 3
    got = _window_attention(vlm, chunk, inject, None)
    assert torch.isnan(got[:, : inject - 1]).all() and not torch.isnan(got[:, inject - 1 :]).any()
    tok, template = vlm.tokenizer, get_template(vlm.template)
    kw = dict(image_token_id=vlm.image_token_id, num_image_tokens=vlm.num_vision_tokens, for_generation=True)
    batch = Collator.for_tokenizer(tok, padding_side="left")([encode_sample(s, tok, template, **kw) for s in chunk])
    ids, am = batch["input_ids"], batch["attention_mask"]
    vision = ids == vlm.image_token_id
    pos = (am.cumsum(1) - 1).clamp(min=0)
    text = am.bool() & ~vision
    rows = [ids[b, text[b]] for b in range(len(chunk))]  # each row's text alone, left padded
    T = max(len(r) for r in rows)
    t_ids, t_am, t_pos = (torch.zeros(len(rows), T, dtype=torch.long) for _ in range(3))
    for b, r in enumerate(rows):
        t_ids[b, T - len(r) :], t_am[b, T - len(r) :], t_pos[b, T - len(r) :] = r, 1, pos[b, text[b]]
    lm = vlm.lm.model.language_model  # the stock LlamaModel
    layers = lm.layers
    entering = {}

    def keep(module, args, kwargs):
        entering["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = layers[inject - 1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        lm(input_ids=t_ids, attention_mask=t_am, position_ids=t_pos)
    finally:
        hook.remove()
    full = vlm.lm.get_input_embeddings()(ids).clone()
    pixels = torch.stack([vlm.image_processor(s.load_image()) for s in chunk])
    full[vision] = vlm.vision_embeds(pixels).reshape(-1, full.shape[-1])  # raw, untouched by earlier layers
    for b in range(len(chunk)):
        full[b, text[b]] = entering["h"][b, T - len(rows[b]) :]
    vlm.lm.set_attn_implementation("eager")
    lm.layers = layers[inject - 1 :]
    try:
        deep = lm(inputs_embeds=full, attention_mask=am, position_ids=pos, output_attentions=True)
    finally:
        lm.layers = layers
        vlm.lm.set_attn_implementation("sdpa")
    for j, attention in enumerate(deep.attentions):
        for b in range(len(chunk)):
            expect = attention[b, :, -1][:, vision[b]].float()
            torch.testing.assert_close(got[b, inject - 1 + j], expect, atol=1e-5, rtol=1e-4)
    exited = _window_attention(vlm, chunk, inject, 6)  # vision leaves before L6: nothing to attend to there
    assert torch.isnan(exited[:, 5:]).all()
    torch.testing.assert_close(exited[:, inject - 1 : 5], got[:, inject - 1 : 5])  # the same up to the exit


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
                    "sweep_samples_max": 12,  # no sweep_samples: grown until all tokens beats blind, here to 12
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
    # ILVAS was measured on the model with the proposed injection and exit (the paper's setting)
    proposed = result["proposal"]["schedule"]
    assert result["curves"]["ilvas_window"] == [proposed["inject_layer"], proposed["exit_layer"]]
    assert cfg.train.stage in ("pretrain", "finetune")  # `hidrop train` takes it as is (its train: defaults)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny_analyze").experiment_id])
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "s_intra")) == 8
    # the sweep size was searched; an unresolved all-tokens-vs-blind gap is warned about with its interval
    sweeps = result["sweeps"]
    assert [t["samples"] for t in result["sweep_signal_search"]] == [12] and sweeps["questions"] == 12
    assert bool(result["warnings"]) == (not sweeps["signal"]["resolved"])
    assert all(len(iv) == 2 and iv[0] <= iv[1] for iv in sweeps["exit_diff_interval"] + sweeps["inject_diff_interval"])
    assert len(client.get_metric_history(runs[0].info.run_id, "exit_sweep_diff_lo")) == len(sweeps["layers"])
    # the proposal seeds a search as is
    from hidrop_platform.config.loader import validate_config

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


# ---- decisions on intervals (issue: diagnostics that decide with intervals) -------------------------
def _records(scores, units=None):
    units = units or [str(i) for i in range(len(scores))]
    return [
        QuestionRecord(id=str(i), prediction="", score=float(x), unit=u) for i, (x, u) in enumerate(zip(scores, units))
    ]


def test_sweep_statistics_match_scipys_paired_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    hard = rng.random(300) < 0.4  # shared difficulty: both methods fail the hard questions more often
    ref = ((rng.random(300) < 0.9) & ~hard) | (hard & (rng.random(300) < 0.3))
    method = ref & (rng.random(300) < 0.9)
    records = {"all_tokens": {"b": _records(ref)}, "x": {"b": _records(method)}}
    ours = sweep_statistics(records, "all_tokens", n_resamples=4000, seed=1)["x"]
    diff = 100.0 * (method.astype(float) - ref.astype(float))
    theirs = bootstrap((diff,), np.mean, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert ours["diff"] == pytest.approx(diff.mean())
    assert ours["diff_interval"] == pytest.approx([theirs.low, theirs.high], abs=1.0)
    alone = bootstrap((100.0 * method,), np.mean, n_resamples=4000, method="percentile", random_state=2)
    assert ours["interval"] == pytest.approx(list(alone.confidence_interval), abs=1.0)
    # paired: far narrower than the two intervals' widths would suggest
    width = ours["diff_interval"][1] - ours["diff_interval"][0]
    assert width < 0.7 * (ours["interval"][1] - ours["interval"][0]) * math.sqrt(2)
    # units resample whole: two identical questions per unit are one question's worth of evidence
    units = [str(i // 2) for i in range(300)]
    doubled = np.repeat(method[::2], 2)
    grouped = sweep_statistics(
        {"all_tokens": {"b": _records(np.ones(300), units)}, "x": {"b": _records(doubled, units)}}, "all_tokens"
    )["x"]
    flat = sweep_statistics({"all_tokens": {"b": _records(np.ones(300))}, "x": {"b": _records(doubled)}}, "all_tokens")[
        "x"
    ]
    ratio = (grouped["interval"][1] - grouped["interval"][0]) / (flat["interval"][1] - flat["interval"][0])
    assert 1.2 < ratio < 1.7  # about sqrt(2)


def test_verdicts_and_the_questions_that_would_resolve_them():
    assert [verdict(i, 2.0) for i in ([-5, -2.5], [-1.5, 3], [-4, 1])] == ["loses", "clear", "inconclusive"]
    # half-width 10 at 50 questions, 5 points from the threshold: 4x the questions halve the width
    assert questions_to_resolve(-7.0, [-17.0, 3.0], 2.0, 50) == 200
    assert questions_to_resolve(-2.0, [-5.0, 1.0], 2.0, 50) is None  # on the threshold: no n resolves it


WITHIN = [-1.0, 1.0]


def _sweeps_with(exit_points=None, inject_points=None, loses_before=None, questions=96, L=24):
    """Sweeps over L2..L`L`: each point "within" ([-1, +1]) unless given as {layer: (diff, interval)};
    exits before `loses_before` lose clearly."""
    layers = list(range(2, L + 1))
    out = {"layers": layers, "all_tokens": 70.0, "blind": 30.0, "questions": questions}
    for kind, given in (("exit", exit_points or {}), ("inject", inject_points or {})):
        diffs, intervals = [], []
        for layer in layers:
            if layer in given:
                d, iv = given[layer]
            elif kind == "exit" and loses_before and layer < loses_before:
                d, iv = -20.0, [-24.0, -16.0]
            elif kind == "inject" and given and layer > max(given):
                d, iv = -20.0, [-24.0, -16.0]
            else:
                d, iv = 0.0, WITHIN
            diffs.append(d)
            intervals.append(iv)
        out[kind] = [70 + d for d in diffs]
        out[f"{kind}_diff"], out[f"{kind}_diff_interval"] = diffs, intervals
    return out


def test_the_proposal_follows_the_interval_not_the_point_estimate():
    curves, _ = _constructed()  # the curves alone: inject at L6
    # exit: L16's point (-1.0) is inside the 2-point tolerance, but its whole interval lies below it
    sweeps = _sweeps_with(exit_points={16: (-1.0, [-3.5, -2.2])}, loses_before=16)
    p = propose(curves, sweeps, avg_tokens=25.0)
    assert p["schedule_fields"]["exit_layer"] == 17  # the point rule would say L16
    assert "L16: -1.0 [-3.5, -2.2]" in p["why"]["exit_layer"] and "loses more" in p["why"]["exit_layer"]
    # the reverse: L15's point (-3.0) is outside the tolerance, but its interval reaches above it
    sweeps = _sweeps_with(exit_points={15: (-3.0, [-6.0, -0.5])}, loses_before=15)
    p = propose(curves, sweeps, avg_tokens=25.0)
    assert p["schedule_fields"]["exit_layer"] == 15  # the point rule would say L16
    reason = p["why"]["exit_layer"]
    assert "L15: -3.0 [-6.0, -0.5]" in reason and "inconclusive at 96 questions" in reason
    assert f"about {questions_to_resolve(-3.0, [-6.0, -0.5], 2.0, 96)} would resolve it" in reason
    # injection: L4's point (-1.5) is inside the tolerance, its interval wholly below: inject at L3
    sweeps = _sweeps_with(inject_points={2: (0.0, WITHIN), 3: (-0.5, WITHIN), 4: (-1.5, [-2.9, -2.1])})
    p = propose(curves, sweeps, avg_tokens=25.0)
    assert p["schedule_fields"]["inject_layer"] == 3 and "L4: -1.5 [-2.9, -2.1]" in p["why"]["inject_layer"]
    # the reverse: L4's point (-2.5) is outside, its interval reaches above -2: not shown to lose
    sweeps = _sweeps_with(inject_points={2: (0.0, WITHIN), 3: (-0.5, WITHIN), 4: (-2.5, [-5.5, 0.5])})
    p = propose(curves, sweeps, avg_tokens=25.0)
    assert p["schedule_fields"]["inject_layer"] == 4  # injecting at L5 is the first that loses
    assert "L5: -20.0 [-24.0, -16.0]" in p["why"]["inject_layer"]


def test_ilvas_maxima_must_stand_out_of_their_spread():
    L, n = 24, 32
    rng = np.random.default_rng(0)
    base = np.full(L, 0.5)
    base[[8, 11, 14]] += 0.03  # bumps at L9, L12, L15
    noisy = base + rng.normal(0, 0.3, size=(n, L))  # the bumps drown in the per-sample spread
    noisy -= noisy.mean(0) - base  # the mean curve is exactly `base`: the same maxima by point estimate
    clean = base + rng.normal(0, 0.003, size=(n, L))
    clean -= clean.mean(0) - base
    assert significant_maxima(list(base), clean.tolist(), 6, 20) == ([9, 12, 15], [])
    assert significant_maxima(list(base), noisy.tolist(), 6, 20) == ([], [9, 12, 15])
    curves, sweeps = _constructed(L)
    curves = dict(curves, ilvas_mean=list(base), ilvas_mean_per_sample=noisy.tolist(), samples=n)
    p = propose(curves, sweeps, avg_tokens=25.0, stages=3)
    assert p["schedule_fields"]["drop_layers"] != [9, 12, 15]
    assert "lie within their spread over 32 calibration samples" in p["why"]["drop_layers"]
    curves["ilvas_mean_per_sample"] = clean.tolist()
    p = propose(curves, sweeps, avg_tokens=25.0, stages=3)
    assert p["schedule_fields"]["drop_layers"] == [9, 12, 15] and "stand out" in p["why"]["drop_layers"]


def test_curve_standard_errors_are_the_spread_of_single_sample_curves(vlm, samples):
    both = layer_curves(vlm, samples, ilvas_k=[3], ilvas_n=[2], batch_size=4)
    singles = [layer_curves(vlm, [s], ilvas_k=[3], ilvas_n=[2]) for s in samples]
    for key in ("s_intra", "s_cross", "ilvas_mean"):
        rows = np.array([[np.nan if v is None else v for v in c[key]] for c in singles])
        expected = rows.std(axis=0, ddof=1) / math.sqrt(len(samples))
        got = np.array([np.nan if v is None else v for v in both[key + "_se"]])
        assert np.allclose(got, expected, atol=1e-6, equal_nan=True), key
    assert len(both["ilvas_mean_per_sample"]) == len(samples)


def test_sweep_questions_grow_until_all_tokens_beats_blind():
    from hidrop_platform.evaluate.analyze import choose_sweep_samples

    def measure(n):  # a true gap of 8 points, an interval half-width of 20 at 48 questions
        half = 20 * math.sqrt(48 / n)
        return {"diff": 8.0, "interval": [8.0 - half, 8.0 + half], "questions": n}

    n, tried = choose_sweep_samples(measure, start=48, most=768)
    assert n == 384 and [t["samples"] for t in tried] == [48, 96, 192, 384]
    n, tried = choose_sweep_samples(measure, start=48, most=100)
    assert n == 100 and tried[-1]["interval"][0] < 0  # the cap: the caller warns with this interval
    n, tried = choose_sweep_samples(lambda k: {**measure(60), "questions": 60}, start=48)
    assert n == 96 and len(tried) == 2  # the benchmark ran out of questions
