"""Bootstrap intervals and paired comparisons against known answers (scipy, closed forms, brute force)."""

import math

import numpy as np
import pytest
from scipy import stats

from hidrop.evaluation.paper import MME, POPE, MMBench
from hidrop.evaluation.registry import Benchmark
from hidrop.evaluation.uncertainty import (
    Resampler,
    bootstrap_p,
    mcnemar_p,
    paired_relative,
    percentile_interval,
)
from hidrop.sample import Sample


def _samples(n, family="", meta=None):
    return [
        Sample(id=f"q{i}", conversations=(), answer="yes", family=family, meta=meta(i) if meta else {})
        for i in range(n)
    ]


def test_mean_score_interval_matches_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(0)
    scores = (rng.random(400) < 0.62).astype(float)  # 0/1 with p = 0.62
    bench = Benchmark()
    r = Resampler(bench, _samples(400), seed=1, n_resamples=4000)
    assert r.fast
    lo, hi = percentile_interval(r.statistics(scores))
    ref = stats.bootstrap((scores * 100,), np.mean, n_resamples=4000, method="percentile", random_state=1)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.8)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.8)
    p = scores.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / 400) * 100
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < 100 * p < hi


def test_vqa_soft_scores_interval_is_the_mean_bootstrap():
    rng = np.random.default_rng(3)
    scores = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=300)
    r = Resampler(Benchmark(), _samples(300), seed=2, n_resamples=2000)
    lo, hi = percentile_interval(r.statistics(scores))
    se = scores.std(ddof=1) / math.sqrt(300) * 100
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.12)


def test_mme_resamples_image_pairs_and_mmbench_circular_groups():
    mme = MME(root="/nonexistent")
    pairs = _samples(40, family="color", meta=lambda i: {"image_key": f"img{i // 2}"})
    r = Resampler(mme, pairs, seed=0, n_resamples=50)
    assert not r.fast and len(r.units) == 20 and all(len(u) == 2 for u in r.units)
    scores = [1.0] * 40
    assert np.allclose(r.statistics(scores), mme.aggregate(pairs, scores)["score"])  # all right: no spread
    mmb = MMBench(root="/nonexistent")
    groups = _samples(30, family="", meta=lambda i: {"group": i // 3})
    r = Resampler(mmb, groups, seed=0, n_resamples=200)
    assert len(r.units) == 10 and all(len(u) == 3 for u in r.units)
    # a group counts only when every rotation is right: 5 of 10 groups right -> circular accuracy near 50
    scores = [1.0 if i // 3 < 5 else (1.0 if i % 3 else 0.0) for i in range(30)]
    values = r.statistics(scores)
    assert mmb.aggregate(groups, scores)["score"] == pytest.approx(50.0)
    assert set(np.round(values, 6)) <= {round(100 * k / 10, 6) for k in range(11)}  # whole groups only


def test_pope_resamples_within_each_split():
    pope = POPE(root="/nonexistent")
    samples = [
        Sample(id=f"{split}{i}", conversations=(), answer=("yes" if i % 2 else "no"), family=split)
        for split in ("adversarial", "random")
        for i in range(20)
    ]
    r = Resampler(pope, samples, seed=0, n_resamples=100)
    strata = {pope.stratum(samples[u[0]]) for u in r.units}
    assert strata == {"adversarial", "random"}
    for row in r.unit_picks:  # every resample keeps 20 questions of each split
        drawn = [samples[r.units[u][0]].family for u in row]
        assert drawn.count("adversarial") == drawn.count("random") == 20


def test_paired_relative_interval_is_narrower_than_unpaired_on_correlated_records():
    rng = np.random.default_rng(5)
    difficulty = rng.random(300)
    reference = (difficulty < 0.7).astype(float)
    method = np.where(rng.random(300) < 0.9, reference, 1 - reference)  # agrees with the reference 90% of the time
    r = Resampler(Benchmark(), _samples(300), seed=0, n_resamples=2000)
    paired = paired_relative({"b": r.statistics(method)}, {"b": r.statistics(reference)})
    other = Resampler(Benchmark(), _samples(300), seed=99, n_resamples=2000)  # independent draws
    unpaired = paired_relative({"b": r.statistics(method)}, {"b": other.statistics(reference)})
    lo, hi = percentile_interval(paired)
    ulo, uhi = percentile_interval(unpaired)
    point = 100 * method.mean() / reference.mean()
    assert lo < point < hi and (hi - lo) < 0.8 * (uhi - ulo)


def test_mcnemar_and_bootstrap_p():
    a = np.array([1] * 30 + [0] * 10 + [1] * 50 + [0] * 10, dtype=float)
    b = np.array([0] * 30 + [1] * 10 + [1] * 50 + [0] * 10, dtype=float)
    assert mcnemar_p(a, b) == pytest.approx(stats.binomtest(30, 40, 0.5).pvalue)
    assert mcnemar_p(a, a) == 1.0 and mcnemar_p([0.5], [1.0]) is None
    assert bootstrap_p(np.array([1.0, 2.0, 3.0])) == 0.0
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)


def test_resampling_is_seeded():
    s = _samples(50)
    scores = np.random.default_rng(0).random(50)
    a = Resampler(Benchmark(), s, seed=4).statistics(scores)
    b = Resampler(Benchmark(), s, seed=4).statistics(scores)
    c = Resampler(Benchmark(), s, seed=5).statistics(scores)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---- on a report ---------------------------------------------------------------------------------------
def _report(raw: dict[str, dict[str, list[float]]]):
    from hidrop.evaluation.results import EvalReport
    from hidrop.schedule import preset

    methods = []
    for name, per_bench in raw.items():
        kind = {"all_tokens": "all_tokens", "blind": "blind"}.get(name, "schedule")
        scores = {b: 100 * float(np.mean(v)) for b, v in per_bench.items()}
        methods.append(
            {
                "method": name,
                "kind": kind,
                "schedule": preset("vanilla", 8, 16).model_dump(mode="json"),
                "plan": "x",
                "benchmarks": {
                    b: {"score": s, "samples": len(raw[name][b]), "mode": "closed"} for b, s in scores.items()
                },
                "relative_score": None,
                "avg_vision_tokens": 16.0,
                "vision_tflops": 0.1,
                "model_tflops": 1.0,
            }
        )
    report = EvalReport.model_validate(
        {
            "model": {"kind": "tiny_llava", "num_layers": 8, "num_vision_tokens": 16},
            "reference": "all_tokens",
            "methods": methods,
            "samples_evaluated": 0,
            "benchmarks": [{"name": b, "samples": len(v), "mode": "closed"} for b, v in raw["all_tokens"].items()],
            "mean_text_tokens": 10.0,
            "wall_time_s": 1.0,
        }
    )
    ref = report.reference_row().scores()
    for m in report.methods:
        m.relative_score = 100 * float(np.mean([m.scores()[b] / ref[b] for b in ref]))
    return report


def test_signal_check_excludes_a_benchmark_without_signal_and_marks_like_methods():
    from hidrop.evaluation.uncertainty import attach_intervals

    n = 200
    rng = np.random.default_rng(0)
    seen = (rng.random(n) < 0.8).astype(float)  # "signal": all tokens right 80%, blind 30%
    blind_seen = np.where(rng.random(n) < 0.3, 1.0, 0.0)
    noise = (rng.random(n) < 0.5).astype(float)  # "noise": all tokens and blind the same answers
    raw = {
        "all_tokens": {"signal": seen.tolist(), "noise": noise.tolist()},
        "copy": {"signal": seen.tolist(), "noise": noise.tolist()},  # identical to all tokens
        "blind": {"signal": blind_seen.tolist(), "noise": noise.tolist()},
        "blindish": {
            "signal": np.where(rng.random(n) < 0.9, blind_seen, 1 - blind_seen).tolist(),
            "noise": noise.tolist(),
        },
    }
    report = _report(raw)
    plans = [(Benchmark(), _samples(n)) for _ in range(2)]
    plans[0][0].name, plans[1][0].name = "signal", "noise"
    attach_intervals(report, plans, raw, seed=0, require_signal=True, n_resamples=500)
    assert report.signal["signal"].has_signal() and not report.signal["noise"].has_signal()
    assert report.signal["noise"].excluded and not report.signal["signal"].excluded
    assert any(note.startswith("noise: all tokens ") and "no signal, excluded" in note for note in report.notes)
    # relative scores now over the benchmark with signal only
    assert report.method("blind").relative_score == pytest.approx(100 * blind_seen.mean() / seen.mean())
    copy = report.method("copy")
    assert copy.like_reference and copy.relative_interval == [pytest.approx(100.0), pytest.approx(100.0)]
    assert report.method("blindish").like_blind and not report.method("blindish").like_reference
    assert not copy.like_blind
    e = report.method("blind").benchmarks["signal"]
    assert e.interval[0] < e.score < e.interval[1] and e.vs_reference.significant()
    assert e.vs_reference.p_value < 1e-6  # exact McNemar on 0/1 answers
    # without require_signal both stay, with a note
    report2 = _report(raw)
    attach_intervals(report2, plans, raw, seed=0, require_signal=False, n_resamples=200)
    assert not report2.signal["noise"].excluded and any("no signal there" in n for n in report2.notes)
    assert report2.method("blind").relative_score == pytest.approx(
        100 * np.mean([blind_seen.mean() / seen.mean(), 1.0])
    )


def test_eval_cli_prints_intervals_writes_records_and_json_bounds(tmp_path):
    import gzip
    import json

    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: tiny_eval\nmodel: {kind: tiny_llava}\nschedule: {preset: hidrop_tok64}\n"
        "eval:\n  benchmarks: [{name: easy_vqa, limit: 12}]\n  batch_size: 6\n  resamples: 200\n"
    )
    records = tmp_path / "out" / "records.jsonl.gz"
    result = CliRunner().invoke(app, ["eval", str(exp), "--json", "--records", str(records)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_resamples"] == 200
    for m in report["methods"]:
        e = m["benchmarks"]["easy_vqa"]
        assert e["interval"][0] <= e["score"] <= e["interval"][1] and "records" not in e
    rows = [json.loads(line) for line in gzip.open(records, "rt")]
    methods = {m["method"] for m in report["methods"]}
    assert {r["method"] for r in rows} == methods and len(rows) == 12 * len(methods)
    by_method = {m: [r["score"] for r in rows if r["method"] == m] for m in methods}
    for m in report["methods"]:  # the records add up to the reported scores
        assert 100 * np.mean(by_method[m["method"]]) == pytest.approx(m["benchmarks"]["easy_vqa"]["score"])
    table = CliRunner().invoke(app, ["eval", str(exp)])
    assert table.exit_code == 0 and "bootstrap" in table.output and " [" in table.output
    bad = CliRunner().invoke(app, ["eval", str(exp), "--records", str(tmp_path / "r.csv")])
    assert bad.exit_code == 2 and "JSON lines" in bad.output


def test_mme_resamples_keep_every_category_and_p_values_follow_the_unit():
    from hidrop.evaluation.uncertainty import attach_intervals

    mme = MME(root="/nonexistent")
    cats = ("color", "count")
    pairs = [
        Sample(id=f"{c}{i}", conversations=(), answer="Yes", family=c, meta={"image_key": f"{c}{i // 2}"})
        for c in cats
        for i in range(8)
    ]
    r = Resampler(mme, pairs, seed=0, n_resamples=100)
    for row in r.unit_picks:  # every resample draws 4 pairs of each category
        drawn = [pairs[r.units[u][0]].family for u in row]
        assert drawn.count("color") == drawn.count("count") == 4
    # grouped metric: the p-value is the bootstrap's, not McNemar's on questions
    raw = {"all_tokens": {"mme": [1.0] * 16}, "x": {"mme": [1.0, 0.0] * 8}}
    report = _report(raw)
    attach_intervals(report, [(mme, pairs)], raw, n_resamples=200)
    assert report.method("x").benchmarks["mme"].vs_reference.p_value == pytest.approx(0.0)
    assert mcnemar_p(raw["x"]["mme"], raw["all_tokens"]["mme"]) > 0  # McNemar would have said otherwise


def test_compare_methods_is_the_paired_difference_attach_intervals_uses():
    from hidrop.evaluation.results import QuestionRecord
    from hidrop.evaluation.uncertainty import attach_intervals, compare_methods

    n = 150
    rng = np.random.default_rng(4)
    truth = (rng.random(n) < 0.8).astype(float)
    blind = (rng.random(n) < 0.3).astype(float)
    near = np.where(rng.random(n) < 0.9, truth, 1 - truth)  # a schedule close to all tokens
    raw = {"all_tokens": {"a": truth.tolist()}, "blind": {"a": blind.tolist()}, "near": {"a": near.tolist()}}
    report = _report(raw)
    for m in report.methods:
        m.benchmarks["a"].records = [
            QuestionRecord(id=f"q{i}", prediction="", score=s, unit=f"q{i}") for i, s in enumerate(raw[m.method]["a"])
        ]
    plans = [(Benchmark(), _samples(n))]
    plans[0][0].name = "a"
    attach_intervals(report, plans, raw, seed=3, n_resamples=400)
    d = compare_methods(report, plans, "near", "blind", seed=3, n_resamples=400)
    assert d.difference == pytest.approx(report.method("near").relative_score - report.method("blind").relative_score)
    assert d.significant() and d.low > 0 and d.p_value < 0.01
    assert report.method("near").above_blind  # the same paired test, the same verdict
    same = compare_methods(report, plans, "near", "near", seed=3, n_resamples=400)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
