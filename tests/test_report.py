"""`hidrop report` on a store written through the project's own Tracker, with hand-chosen figures: every
number in the tables is checked against what was logged, the blind row and Pareto flags against
hand/brute-force computation, and the files against what was published on the parent run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hidrop_dashboards.report import ReportError, build_report, collect
from hidrop_dashboards.tables import methods_table
from hidrop_platform.tracking.store import TrackingUnavailable, check_readable, default_tracking_uri, prepare
from hidrop_platform.tracking.tracker import Tracker
from hidrop_platform.tune.pareto import pareto_front

REFERENCE = {"easy_vqa": 60.0, "probes": 80.0}
BLIND = {"easy_vqa": 30.0, "probes": 60.0}  # relative: (50 + 75) / 2 = 62.5
# label, seed, per-benchmark scores, avg tokens, vision TFLOPs
TRIALS = [
    ("seed:vanilla", True, {"easy_vqa": 60.0, "probes": 80.0}, 196.0, 1.00),
    ("seed:fastv", True, {"easy_vqa": 57.0, "probes": 76.0}, 104.5, 0.53),
    ("seed:pdrop", True, {"easy_vqa": 54.0, "probes": 78.0}, 94.0, 0.48),
    ("seed:hidrop_tok64", True, {"easy_vqa": 36.0, "probes": 64.0}, 23.3, 0.12),
    ("trial-001", False, {"easy_vqa": 45.0, "probes": 70.0}, 30.0, 0.15),  # front
    ("trial-002", False, {"easy_vqa": 33.0, "probes": 60.0}, 40.0, 0.20),  # dominated by trial-001
    ("trial-003", False, {"easy_vqa": 30.0, "probes": 56.0}, 8.0, 0.04),  # front: the cheapest
]


def relative(scores: dict) -> float:
    return sum(100.0 * scores[b] / REFERENCE[b] for b in REFERENCE) / len(REFERENCE)


def _log_sweep(uri: str, experiment: str, name: str, trials=TRIALS, finish: str = "FINISHED") -> str:
    parent = Tracker(
        uri, experiment, run_name=f"sweep:{name}", tags={"hidrop.sweep": name, "hidrop.kind": "sweep"}
    ).start()
    parent.log_metrics(
        {**{f"reference/{b}": v for b, v in REFERENCE.items()}, **{f"blind/{b}": v for b, v in BLIND.items()}}, step=0
    )
    for label, seed, scores, tokens, tflops in trials:
        child = Tracker(
            uri,
            experiment,
            run_name=label,
            parent_run_id=parent.run_id,
            tags={"hidrop.sweep": name, "hidrop.seed": str(seed), "device_type": "cpu"},
        ).start()
        child.log_params({"schedule.plan": f"plan of {label}"})
        child.log_metrics(
            {
                "relative_score": relative(scores),
                "avg_vision_tokens": tokens,
                "vision_tflops": tflops,
                "model_tflops": tflops + 0.5,
                "accelerator_hours": 0.001,
                "samples": 40,
                **{f"score/{b}": v for b, v in scores.items()},
            },
            step=0,
        )
        child.set_tags({"status": "finished"})
        child.finish()
    parent.finish(finish)
    return parent.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("store")
    uri = default_tracking_uri(root)
    prepare(uri, "exp")
    spool = root / "spool"
    old = _log_sweep(uri, "exp", "old", trials=TRIALS[:2])
    parent = _log_sweep(uri, "exp", "s1")
    # a trial that failed after logging metrics that would dominate everything: never on the front
    failed = Tracker(
        uri, "exp", run_name="trial-009", parent_run_id=parent, tags={"hidrop.sweep": "s1", "hidrop.seed": "False"}
    ).start()
    failed.log_metrics({"relative_score": 150.0, "vision_tflops": 0.01, "avg_vision_tokens": 2.0}, step=0)
    failed.set_tags({"status": "failed"})
    failed.finish("FAILED")
    _log_sweep(uri, "exp", "broken", trials=TRIALS[:1], finish="FAILED")  # newest, but not finished
    for method, tokens, hours in (("vanilla", 196.0, 0.02), ("hidrop", 23.3, 0.011)):
        run = Tracker(
            uri,
            "exp",
            run_name=f"train-{method}",
            spool_dir=spool,
            tags={"hidrop.kind": "train", "stage": "finetune", "device_type": "cpu", "num_workers": "2"},
        ).start()
        run.log_params({"schedule.preset": method})
        for step, loss in ((1, 2.0), (2, 1.5)):
            run.log_metrics(
                {
                    "loss": loss,
                    "accelerator_hours": hours * step / 2,
                    "avg_vision_tokens": tokens,
                    "vision_tflops_per_sample": tokens / 196,
                    "model_tflops_per_sample": 1.0,
                    "samples_per_s": 3.0,
                },
                step=step,
            )
        run.log_metrics(
            {
                "relative_score": 90.0 if method == "hidrop" else 100.0,
                "score/easy_vqa": 44.0 if method == "hidrop" else 55.0,
            },
            step=2,
        )
        run.finish()
    # an analysis with its plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = root / "curves.png"
    plt.figure(figsize=(2, 2)).savefig(png)
    plt.close("all")
    run = Tracker(uri, "exp", run_name="analyze:x", tags={"hidrop.kind": "analyze"}, spool_dir=spool).start()
    run.log_params({"proposed.inject_layer": 3, "proposed.exit_layer": 25})
    run.log_artifact(png, "analysis")
    run.finish()
    return {"uri": uri, "parent": parent, "old": old, "root": root}


def test_collect_reads_the_newest_finished_sweep(store):
    data = collect(store["uri"], "exp")
    assert data["sweep"]["run_id"] == store["parent"] and data["sweep"]["name"] == "s1"
    assert data["sweep"]["reference_scores"] == REFERENCE and data["sweep"]["blind_scores"] == BLIND
    assert data["sweep"]["blind_relative_score"] == pytest.approx(62.5)
    assert sorted(t.label for t in data["trials"]) == sorted([t[0] for t in TRIALS] + ["trial-009"])
    assert not next(t for t in data["trials"] if t.label == "trial-009").pareto
    # Pareto flags against brute force over what was logged
    points = [(relative(s), c) for _, _, s, _, c in TRIALS]
    expected = {TRIALS[i][0] for i in pareto_front(points)}
    assert {t.label for t in data["trials"] if t.pareto} == expected
    assert "trial-001" in expected and "trial-002" not in expected and "trial-003" in expected
    # a chosen sweep
    assert collect(store["uri"], "exp", sweep="old")["sweep"]["run_id"] == store["old"]


def test_methods_table_matches_the_logged_figures(store):
    table = methods_table(collect(store["uri"], "exp"))
    assert table["columns"] == ["easy_vqa", "probes"]
    methods = [r["method"] for r in table["rows"]]
    # presets in the paper's order, then searched front trials best first, then blind
    assert methods == [
        "LLaVA (all tokens)",
        "FastV",
        "PDrop",
        "HiDrop Tok64",
        "trial-001",
        "trial-003",
        "blind (no image)",
    ]
    by_name = {r["method"]: r for r in table["rows"]}
    for label, _, scores, tokens, _ in TRIALS:
        name = {
            "seed:vanilla": "LLaVA (all tokens)",
            "seed:fastv": "FastV",
            "seed:pdrop": "PDrop",
            "seed:hidrop_tok64": "HiDrop Tok64",
        }.get(label, label)
        if name in by_name:
            assert by_name[name]["scores"] == scores
            assert by_name[name]["relative_score"] == pytest.approx(relative(scores))
            assert by_name[name]["avg_vision_tokens"] == tokens
    assert by_name["blind (no image)"]["scores"] == BLIND
    assert by_name["blind (no image)"]["relative_score"] == pytest.approx(62.5)


def test_build_report_writes_and_publishes(store, tmp_path):
    result = build_report(store["uri"], "exp", tmp_path / "r")
    out = tmp_path / "r"
    for name in ("report.html", "report.md", "report.json", "pareto.png", "training_cost.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    page = (out / "report.html").read_text()
    # self-contained: three figures inline, no external references
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r'(src|href)="(?!data:)', page)
    for text in (
        "HiDrop Tok64",
        "FastV",
        "PDrop",
        "trial-001",
        "blind (no image)",
        "train-hidrop",
        "CPU-hours",
        "inject_layer=3",
        "40 questions per trial over 2 benchmarks: one answer moves a benchmark's score by 5.0",
    ):
        assert text in page, text
    # Table 2 from the training runs' latest values
    saved = json.loads((out / "report.json").read_text())
    rows = {t["name"]: t for t in saved["training_table"]}
    assert rows["train-vanilla"]["accelerator_hours"] == pytest.approx(0.02)
    assert rows["train-hidrop"]["avg_vision_tokens"] == pytest.approx(23.3)
    assert rows["train-hidrop"]["loss"] == pytest.approx(1.5)
    assert rows["train-hidrop"]["relative_score"] == pytest.approx(90.0)
    assert rows["train-hidrop"]["vs_all_tokens_training"] == pytest.approx(80.0)  # 44 / 55
    assert rows["train-vanilla"]["vs_all_tokens_training"] == pytest.approx(100.0)
    # the same files are artifacts on the sweep's parent run
    from mlflow.tracking import MlflowClient

    assert result["published_to_run"] == store["parent"]
    listed = {Path(a.path).name for a in MlflowClient(store["uri"]).list_artifacts(store["parent"], "report")}
    assert {"report.html", "pareto.png", "report.json"} <= listed
    md = (out / "report.md").read_text()
    assert "| HiDrop Tok64 * | 23.3 | 36.0 | 64.0 | 70.0 |" in md  # on the front; (60% + 80%) / 2 = 70


def test_report_errors_are_one_line(store, tmp_path):
    with pytest.raises(ReportError, match=r"no MLflow experiment named 'nope'.*there are: .*exp"):
        collect(store["uri"], "nope")
    with pytest.raises(ReportError, match="no sweep named 'zzz'"):
        collect(store["uri"], "exp", sweep="zzz")
    with pytest.raises(TrackingUnavailable, match="no MLflow store at"):
        check_readable(default_tracking_uri(tmp_path / "empty"))
    assert not (tmp_path / "empty" / "mlruns").exists()  # reading never creates a store


def test_reading_an_empty_file_as_a_store_leaves_it_untouched(store, tmp_path):
    check_readable(store["uri"])  # a store MLflow wrote holds its tables
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(TrackingUnavailable, match="empty.db is not an MLflow store"):
        check_readable(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0 and [p.name for p in tmp_path.iterdir()] == ["empty.db"]  # not migrated


def test_cli_report_and_errors(store, tmp_path):
    hidrop = [sys.executable, "-m", "hidrop_platform.cli"]
    done = subprocess.run(
        [
            *hidrop,
            "report",
            "exp",
            "--tracking-uri",
            store["uri"],
            "--out",
            str(tmp_path / "c"),
            "--no-publish",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["methods"][:4] == ["LLaVA (all tokens)", "FastV", "PDrop", "HiDrop Tok64"]
    assert result["published_to_run"] is None and result["diagnostics"] is True
    for args, message in (
        (["report", "nope", "--tracking-uri", store["uri"]], "no MLflow experiment named 'nope'"),
        (["report", "exp", "--tracking-uri", default_tracking_uri(tmp_path / "x")], "no MLflow store at"),
        (["report", "exp", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["ui", "--tracking-uri", default_tracking_uri(tmp_path / "x")], "no MLflow store at"),
        (["demo", "--size", "huge"], "--size must be one of"),
    ):
        done = subprocess.run([*hidrop, *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = [l for l in done.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)


def test_p_values_below_the_resolution_print_as_such_everywhere():
    """A resampled p-value of 0 printed as "p = 0" (and "p=0.000"): it only says p < 0.001."""
    from hidrop.evaluation.uncertainty import format_p
    from hidrop_platform.bench.search import _best_text
    from hidrop_platform.evaluate.compare import pair_text

    assert [format_p(p) for p in (0.0, 0.0004, 0.001, 0.012, 0.57, 1.0)] == [
        "p < 0.001",
        "p < 0.001",
        "p = 0.001",
        "p = 0.012",
        "p = 0.57",
        "p = 1",
    ]
    assert format_p(None) == format_p(float("nan")) == "p = n/a"
    pair = {"a": "hidrop", "b": "blind", "difference": 30.0, "interval": [25.0, 35.0], "p_value": 0.0}
    assert pair_text(pair).endswith("points, p < 0.001")
    d = {"difference": 5.0, "low": 2.0, "high": 8.0, "p_value": 0.0}
    out = {
        "exhaustive": {"best_confirmed": [80.0], "best_under_budget": "a"},
        "multi_fidelity": {"best_confirmed": [75.0], "best_under_budget": "b"},
        "best_difference": d,
    }
    text = _best_text(out)
    assert "(p < 0.001)" in text and "p=0" not in text and "p = 0" not in text


def test_tiny_model_tflops_keep_significant_digits():
    """The mini-LLaVA's vision cost (~3e-5 TFLOPs) printed as 0.0000; the LLaVA-7B figures stay fixed."""
    from hidrop.cost import format_tflops

    assert format_tflops(3.3e-05, 4) == "3.3e-05" and format_tflops(0.000123) == "0.000123"
    assert format_tflops(0.0421, 4) == "0.0421"
    assert format_tflops(0.421) == "0.421" and format_tflops(1.0604) == "1.060" and format_tflops(3.817, 4) == "3.8170"
    assert format_tflops(0.0) == "0.000" and format_tflops(None) == format_tflops(float("nan")) == "-"


def test_wide_tables_scroll_inside_the_page():
    """The methods table (one column per benchmark) ran off the page: every table sits in a scrolling box."""
    from hidrop_dashboards.html_report import STYLE, _html_table

    table = _html_table(["method", *(f"benchmark {i}" for i in range(30))], [["x", *["1.0"] * 30]])
    assert table.startswith('<div class="wide"><table>') and table.endswith("</table></div>")
    assert re.search(r"\.wide\{[^}]*overflow-x:auto", STYLE)


def test_pareto_legend_and_line_labels_stay_off_the_plot_area():
    """The legend (lower right) and the blind line's label sat on the blind band and the cheap trials."""
    import matplotlib.pyplot as plt

    from hidrop_platform.tune.pareto import pareto_figure

    rows = [
        {"label": f"seed:{name}", "seed": True, "relative_score": s, "vision_tflops": c, "pareto": True}
        for name, s, c in (("vanilla", 100.0, 1.0), ("hidrop_tok64", 70.0, 0.1), ("tiny", 62.0, 0.01))
    ]
    rows.append({"label": "trial-001", "relative_score": 63.0, "vision_tflops": 0.05})
    fig = pareto_figure(
        rows, "t", reference_lines={"all tokens": 100.0, "blind": 62.5}, reference_bands={"blind": (58.0, 66.0)}
    )
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        area = ax.get_window_extent(renderer)
        assert not ax.get_legend().get_window_extent(renderer).overlaps(area)
        labels = [t for t in ax.texts if t.get_text() in ("all tokens", "blind")]
        assert len(labels) == 2
        assert all(t.get_window_extent(renderer).x0 >= area.x1 for t in labels)
    finally:
        plt.close(fig)
