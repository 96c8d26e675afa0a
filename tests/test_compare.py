"""`hidrop compare`: methods of different record files paired by question id, against hand computation
and scipy's paired bootstrap, and its one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hidrop_platform.evaluate.compare import CompareError, compare


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(method, bench, scores, start=0):
    return [
        {
            "method": method,
            "benchmark": bench,
            "id": f"q{start + i}",
            "unit": f"q{start + i}",
            "prediction": "",
            "score": float(s),
        }
        for i, s in enumerate(scores)
    ]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    hard = rng.random(400) < 0.3
    ref = (rng.random(400) < 0.85) & ~hard | hard & (rng.random(400) < 0.3)
    hid = ref & (rng.random(400) < 0.95)
    pdr = ref & (rng.random(400) < 0.85)
    probes_ref, probes_h, probes_p = (rng.random(60) < q for q in (0.6, 0.55, 0.5))
    a = _write(
        tmp_path / "a.jsonl",
        _rows("all_tokens", "easy_vqa", ref)
        + _rows("hidrop_tok64", "easy_vqa", hid)
        + _rows("all_tokens", "probes", probes_ref)
        + _rows("hidrop_tok64", "probes", probes_h),
    )
    # model B scored one easy-vqa question more: it is left out, with a note
    b = _write(
        tmp_path / "b.jsonl",
        _rows("pdrop_tok64", "easy_vqa", list(pdr) + [1.0]) + _rows("pdrop_tok64", "probes", probes_p),
    )
    return {"a": a, "b": b, "ref": ref, "hid": hid, "pdr": pdr, "probes": (probes_ref, probes_h, probes_p)}


def test_relative_scores_and_paired_differences(files):
    specs = [f"{files['a']}:all_tokens=vanilla", f"{files['a']}:hidrop_tok64=HiDrop", f"{files['b']}:pdrop_tok64=PDrop"]
    both = ["easy_vqa", "probes"]  # the probes are diagnostic: averaged in only when asked
    result = compare(specs, "vanilla", n_resamples=4000, relative_over=both)
    rows = {r["label"]: r for r in result["rows"]}
    pref, ph, pp = files["probes"]
    hand = {
        "HiDrop": 50 * (files["hid"].mean() / files["ref"].mean() + ph.mean() / pref.mean()),
        "PDrop": 50 * (files["pdr"].mean() / files["ref"].mean() + pp.mean() / pref.mean()),
    }
    assert rows["vanilla"]["relative_score"] == pytest.approx(100.0) and rows["vanilla"]["relative_interval"] is None
    for label, value in hand.items():
        assert rows[label]["relative_score"] == pytest.approx(value)
    assert result["benchmarks"] == {"easy_vqa": 400, "probes": 60}
    assert any("easy_vqa: 400 questions every spec scored; 1" in n for n in result["notes"])
    # the HiDrop - PDrop interval against scipy's paired bootstrap of the same statistic
    from scipy.stats import bootstrap

    pair = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("HiDrop", "PDrop"))
    assert pair["difference"] == pytest.approx(hand["HiDrop"] - hand["PDrop"])
    assert compare(specs, "vanilla", n_resamples=4000, relative_over=both)["pairs"] == result["pairs"]  # seeded

    # one benchmark: the HiDrop - PDrop interval against scipy's paired bootstrap of the same statistic
    e = _write(files["a"].with_name("e.jsonl"), _rows("all_tokens", "q", files["ref"]) + _rows("h", "q", files["hid"]))
    f = _write(files["a"].with_name("f.jsonl"), _rows("p", "q", files["pdr"]))
    only = compare([f"{e}:all_tokens=vanilla", f"{e}:h=HiDrop", f"{f}:p=PDrop"], "vanilla", n_resamples=4000)
    ours = next(p for p in only["pairs"] if (p["a"], p["b"]) == ("HiDrop", "PDrop"))

    def statistic(r, h, p):
        return 100 * (h.mean() - p.mean()) / r.mean()

    triple = tuple(files[k].astype(float) for k in ("ref", "hid", "pdr"))
    theirs = bootstrap(
        triple, statistic, paired=True, vectorized=False, n_resamples=4000, method="percentile", random_state=1
    ).confidence_interval
    assert ours["interval"] == pytest.approx([theirs.low, theirs.high], abs=1.0)
    assert (ours["p_value"] < 0.05) == (ours["interval"][0] > 0 or ours["interval"][1] < 0)


def test_bad_specs_are_one_line_errors(files, tmp_path):
    a = files["a"]
    cases = [
        ([str(a)], "x", "expected FILE:METHOD"),
        ([f"{tmp_path / 'none.jsonl'}:all_tokens"], "all_tokens@none", "no such records file"),
        ([f"{a}:fastv=F", f"{a}:all_tokens=R"], "R", "no records of method 'fastv'; it holds all_tokens, hidrop_tok64"),
        ([f"{a}:all_tokens=R", f"{a}:hidrop_tok64=R"], "R", "labels must differ"),
        ([f"{a}:all_tokens=R"], "Q", "--reference 'Q' is none of the labels"),
    ]
    for specs, reference, message in cases:
        with pytest.raises(CompareError, match=message.replace("(", r"\(").replace(")", r"\)")):
            compare(specs, reference)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hidrop_platform.cli",
            "compare",
            f"{a}:fastv=F",
            f"{a}:all_tokens=R",
            "--reference",
            "R",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "hidrop_platform.cli",
            "compare",
            f"{a}:all_tokens=R",
            f"{a}:hidrop_tok64=H",
            "--reference",
            "R",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["pairs"][0]["a"] == "R"


def test_paths_may_hold_equals_signs_and_unshared_benchmarks_are_named(files, tmp_path):
    odd = tmp_path / "lr=2e-5"
    odd.mkdir()
    moved = _write(odd / "a.jsonl", [json.loads(line) for line in files["a"].read_text().splitlines()])
    only_easy = _write(
        tmp_path / "b.jsonl",
        [r for r in map(json.loads, files["b"].read_text().splitlines()) if r["benchmark"] == "easy_vqa"],
    )
    result = compare([f"{moved}:all_tokens=ref", f"{only_easy}:pdrop_tok64=PDrop"], "ref", n_resamples=200)
    assert result["benchmarks"] == {"easy_vqa": 400}
    assert any("left out, not scored by every spec: probes" in n for n in result["notes"])
    # the union minus the shared questions: the one easy-vqa question only b.jsonl has
    assert any("easy_vqa: 400 questions every spec scored; 1 scored by some only" in n for n in result["notes"])


def _family_rows(method, scores_by_family, start=0):
    rows, i = [], start
    for family, scores in scores_by_family.items():
        for s in scores:
            rows.append(
                {
                    "method": method,
                    "benchmark": "probes",
                    "id": f"p{i}",
                    "unit": f"p{i}",
                    "family": family,
                    "prediction": "",
                    "score": float(s),
                    "avg_vision_tokens": 23.3 if method != "blind" else 0.0,
                    "vision_tflops": 0.003,
                }
            )
            i += 1
    return rows


def test_families_and_the_baseline_difference_follow_hand_computation_and_mcnemar(tmp_path):
    """Per family: 100 x the mean over that family's questions, and (vs a baseline) the paired difference
    with the exact McNemar p-value of the discordant pairs; a family far above blind is flagged, one at
    blind level is not."""
    from scipy.stats import binomtest

    from hidrop_platform.evaluate.compare import above_baseline

    rng = np.random.default_rng(3)
    n = 120
    counting_ref = rng.random(n) < 0.9
    counting_blind = rng.random(n) < 0.25  # far below: signal
    spatial_ref = rng.random(n) < 0.5
    spatial_blind = spatial_ref ^ (rng.random(n) < 0.1)  # the same answers but a few: no signal
    f = _write(
        tmp_path / "m.jsonl",
        _family_rows("all_tokens", {"counting": counting_ref, "spatial": spatial_ref})
        + _family_rows("blind", {"counting": counting_blind, "spatial": spatial_blind}),
    )
    result = compare([f"{f}:all_tokens=R", f"{f}:blind=B"], "R", baseline="B", n_resamples=2000)
    rows = {r["label"]: r for r in result["rows"]}
    assert result["families"] == {"probes/counting": n, "probes/spatial": n}
    assert rows["R"]["families"]["probes/counting"] == pytest.approx(100 * counting_ref.mean())
    assert rows["B"]["families"]["probes/spatial"] == pytest.approx(100 * spatial_blind.mean())
    lo, hi = rows["R"]["family_intervals"]["probes/counting"]
    assert lo < 100 * counting_ref.mean() < hi
    assert rows["R"]["avg_vision_tokens"] == 23.3 and rows["B"]["avg_vision_tokens"] == 0.0
    d = rows["R"]["vs_baseline"]["probes/counting"]
    assert d["difference"] == pytest.approx(100 * (counting_ref.mean() - counting_blind.mean()))
    only_r = int((counting_ref & ~counting_blind).sum())
    only_b = int((~counting_ref & counting_blind).sum())
    assert d["p_value"] == pytest.approx(binomtest(only_r, only_r + only_b, 0.5).pvalue)
    assert above_baseline(result, "R") == ["probes", "probes/counting"]
    assert "vs_baseline" not in rows["B"]
    with pytest.raises(CompareError, match="--baseline 'X' is none of the labels"):
        compare([f"{f}:all_tokens=R"], "R", baseline="X")


def test_tracked_comparison_is_the_report_table(tmp_path, files):
    """`--track` logs one compare run; `hidrop report` renders it as its Table 1 layout with intervals."""
    from dashboards.report import build_report
    from hidrop_platform.evaluate.compare import log_comparison

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    specs = [f"{files['a']}:all_tokens=vanilla", f"{files['a']}:hidrop_tok64=HiDrop", f"{files['b']}:pdrop_tok64=PDrop"]
    result = compare(specs, "vanilla", n_resamples=300)
    run_id = log_comparison(result, uri, "cmp")
    assert run_id
    built = build_report(uri, "cmp", tmp_path / "report")
    assert built["comparison"]
    md = (tmp_path / "report" / "report.md").read_text()
    rows = {r["label"]: r for r in result["rows"]}
    h = rows["HiDrop"]
    lo, hi = h["relative_interval"]
    assert f"| HiDrop | - | - | {h['scores']['easy_vqa']:.1f} [" in md
    assert f"{h['relative_score']:.1f} [{lo:.1f}, {hi:.1f}]" in md
    pair = next(p for p in result["pairs"] if p["a"] == "HiDrop" and p["b"] == "PDrop")
    assert f"- HiDrop − PDrop: {pair['difference']:+.1f}" in md
    assert "Methods across evaluations" in (tmp_path / "report" / "report.html").read_text()


def test_relative_over_a_subset_of_benchmarks(files):
    specs = [f"{files['a']}:all_tokens=vanilla", f"{files['a']}:hidrop_tok64=HiDrop"]
    result = compare(specs, "vanilla", n_resamples=300, relative_over=["easy_vqa"])
    h = next(r for r in result["rows"] if r["label"] == "HiDrop")
    assert h["relative_score"] == pytest.approx(100 * files["hid"].mean() / files["ref"].mean())
    assert "probes" in h["scores"] and result["relative_over"] == ["easy_vqa"]
    # by default too: the probes are diagnostic, scored per family but not averaged in, and the note says so
    default = compare(specs, "vanilla", n_resamples=300)
    assert default["relative_over"] == ["easy_vqa"]
    assert next(r for r in default["rows"] if r["label"] == "HiDrop")["relative_score"] == pytest.approx(
        h["relative_score"]
    )
    assert any("relative scores over easy_vqa only (diagnostic by default" in n for n in default["notes"])
    with pytest.raises(CompareError, match="--relative mme: not a benchmark every spec scored"):
        compare(specs, "vanilla", relative_over=["mme"])
