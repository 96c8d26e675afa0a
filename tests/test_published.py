"""The paper's published tables (hidrop/evaluation/published.yaml): their Avg (%) recomputed through the
harness's own `relative_score` against method.md section 11, the matching of measured rows to published
ones, and the reference rows `hidrop eval` and `hidrop report` show with their differences. Expected
figures are typed in here from method.md, not read back from the data file."""

import io
import json

import pytest

from hidrop.evaluation.metrics import relative_score
from hidrop.evaluation.published import (
    AVG_TOLERANCE,
    PublishedError,
    compare,
    comparisons_for,
    exact_preset,
    load_published,
    model_key,
    same_budget,
    schedule_method,
)
from hidrop.evaluation.results import EvalReport
from hidrop.schedule import preset

PAPER11 = [
    "mme",
    "mmbench",
    "mmbench_cn",
    "gqa",
    "vqav2",
    "scienceqa_img",
    "vizwiz",
    "textvqa",
    "pope",
    "seed_image",
    "mmstar",
]
# method.md section 11, typed in: the reference row and the HiDrop 64 row of Table 1
REF = dict(zip(PAPER11, [1506.5, 64.7, 58.1, 61.9, 78.5, 69.5, 50.1, 58.2, 86.8, 66.2, 33.7]))
HIDROP64 = dict(zip(PAPER11, [1473.3, 63.2, 58.0, 60.5, 76.5, 68.9, 52.6, 55.2, 86.4, 64.5, 32.0]))
TABLE2_HIDROP = {"mme": 1474.3, "mmbench": 63.2, "gqa": 60.5, "vizwiz": 52.6, "textvqa": 55.2}
TABLE10_COMPACTED = {"mme": 1452.3, "mmbench": 64.6, "gqa": 61.1, "vizwiz": 48.9, "textvqa": 55.1}


def _avg(row: dict, ref: dict) -> float:
    """Brute force, independent of the project: the mean of the per-benchmark ratios x 100."""
    total = 0.0
    for b in row:
        total += row[b] / ref[b]
    return 100.0 * total / len(row)


# ---- the data file reproduces the paper ------------------------------------------------------------


@pytest.mark.parametrize(
    "row_id, expected",
    [
        ("hidrop_64", 98.3),
        ("hidrop_48", 96.5),
        ("pdrop_64_trained", 94.2),
        ("fastv_64_trained", 91.8),
        ("table2_7b_pdrop", 100.2),
        ("table2_7b_hidrop", 98.6),
        ("table2_2.7b_pdrop", 96.3),
        ("table2_2.7b_hidrop", 94.8),
        ("pe_persistent", 97.8),
        ("pe_compacted", 96.9),
        ("pe_group", 97.1),
    ],
)
def test_published_avg_reproduced_through_relative_score(row_id, expected):
    published = load_published()
    row = published.row(row_id)
    ref = published.reference_of(row)
    again = relative_score(row.scores, ref.scores)  # the harness's Avg (%)
    assert again == pytest.approx(published.recomputed_avg(row))
    assert abs(again - expected) <= 0.1
    assert row.avg_published == expected  # the file records the printed figure


# method.md section 11, the three tables with scores, as printed there (cells separated by |)
SECTION_11 = {
    "table1": """
llava15_7b_reference | 576 | 1506.5 | 64.7 | 58.1 | 61.9 | 78.5 | 69.5 | 50.1 | 58.2 | 86.8 | 66.2 | 33.7 | 100.0
fastv_80_training_free | 80 | 1214.4 | 57.3 | 47.8 | 51.3 | 66.6 | 68.8 | 51.3 | 52.1 | 73.7 | 52.9 | 31.1 | 87.9
pdrop_80_trained | 80 | 1412.1 | 64.6 | 54.7 | 57.9 | 74.3 | 69.8 | 52.4 | 54.3 | 83.7 | 59.3 | 35.0 | 96.8
hidrop_80 | 80 | 1467.0 | 63.7 | 56.3 | 61.3 | 76.6 | 67.5 | 51.4 | 54.9 | 86.6 | 65.3 | 31.2 | 98.4
fastv_64_training_free | 64 | 1086.6 | 53.3 | 42.7 | 48.8 | 61.6 | 68.9 | 50.5 | 49.9 | 67.7 | 49.1 | 29.6 | 82.8
pdrop_64_trained_eval_training_free | 64 | 962.0 | 45.6 | 32.7 | 45.4 | 58.3 | 68.2 | 45.9 | 48.2 | 64.0 | 47.3 | 29.0 | 76.5
fastv_64_trained | 64 | 1303.8 | 61.7 | 52.7 | 56.2 | 70.7 | 70.0 | 43.8 | 51.0 | 83.1 | 55.6 | 33.8 | 91.8
pdrop_64_trained | 64 | 1350.7 | 63.1 | 54.3 | 56.6 | 71.8 | 70.3 | 51.8 | 51.7 | 82.6 | 57.9 | 32.7 | 94.2
hidrop_64 | 64 | 1473.3 | 63.2 | 58.0 | 60.5 | 76.5 | 68.9 | 52.6 | 55.2 | 86.4 | 64.5 | 32.0 | 98.3
fastv_48_training_free | 48 | 816.9 | 37.3 | 29.8 | 42.1 | 49.6 | 68.7 | 47.6 | 46.3 | 56.1 | 42.4 | 25.6 | 70.2
fastv_48_trained | 48 | 1327.4 | 61.3 | 53.6 | 54.4 | 68.4 | 69.0 | 45.8 | 49.6 | 82.2 | 54.6 | 34.4 | 91.4
hidrop_48 | 48 | 1446.4 | 63.7 | 55.5 | 59.8 | 75.6 | 67.7 | 49.5 | 54.4 | 85.8 | 61.8 | 32.7 | 96.5""",
    "table2": """
table2_7b_vanilla | 576 | 159.3 | 3.82 | 1506.5 | 64.7 | 61.9 | 50.1 | 58.2 | 100.0
table2_7b_pdrop | 270 | 107.3 | 1.78 | 1490.1 | 63.9 | 61.7 | 52.4 | 57.7 | 100.2
table2_7b_hidrop | 64 | 94.4 | 0.42 | 1474.3 | 63.2 | 60.5 | 52.6 | 55.2 | 98.6
table2_2.7b_vanilla | 576 | 108.4 | 1.52 | 1258.2 | 57.0 | 59.4 | 32.6 | 48.6 | 100.0
table2_2.7b_pdrop | 270 | 50.3 | 0.70 | 1231.1 | 54.3 | 57.0 | 30.9 | 47.5 | 96.3
table2_2.7b_hidrop | 64 | 45.6 | 0.17 | 1206.6 | 53.1 | 56.1 | 30.4 | 47.2 | 94.8""",
    "table10": """
pe_persistent | 1414.4 | 63.7 | 56.7 | 61.3 | 76.6 | 67.0 | 52.1 | 55.6 | 86.9 | 65.2 | 32.0 | 97.8
pe_compacted | 1452.3 | 64.6 | 56.1 | 61.1 | 76.8 | 67.9 | 48.9 | 55.1 | 86.5 | 64.6 | 30.3 | 96.9
pe_group | 1442.2 | 63.9 | 55.4 | 60.4 | 76.2 | 67.6 | 51.2 | 55.5 | 86.9 | 63.6 | 31.1 | 97.1""",
}
FIVE = ["mme", "mmbench", "gqa", "vizwiz", "textvqa"]


def _typed_rows():
    for table, text in SECTION_11.items():
        for line in text.strip().splitlines():
            row_id, *cells = [c.strip() for c in line.split("|")]
            values = [float(c) for c in cells]
            if table == "table1":
                yield row_id, {"tokens": values[0], "scores": dict(zip(PAPER11, values[1:12])), "avg": values[12]}
            elif table == "table2":
                yield (
                    row_id,
                    {
                        "tokens": values[0],
                        "train_gpu_hours": values[1],
                        "infer_tflops": values[2],
                        "scores": dict(zip(FIVE, values[3:8])),
                        "avg": values[8],
                    },
                )
            else:
                yield row_id, {"scores": dict(zip(PAPER11, values[:11])), "avg": values[11]}


def test_every_row_equals_method_md_and_recomputes_by_brute_force():
    published = load_published()
    typed = dict(_typed_rows())
    assert sorted(typed) == sorted(r.id for t in published.tables.values() for r in t.rows)
    for row_id, want in typed.items():
        row = published.row(row_id)
        assert row.scores == want["scores"] and row.avg_published == want["avg"], row_id
        for key in ("tokens", "train_gpu_hours", "infer_tflops"):
            if key in want:
                assert getattr(row, key) == want[key], (row_id, key)
        ref_id = "llava15_7b_reference" if row_id.startswith("pe_") else published.table_of(row)[1].reference
        brute = _avg(want["scores"], typed[ref_id]["scores"] if ref_id in typed else REF)
        assert published.recomputed_avg(row) == pytest.approx(brute), row_id
        if row_id != "hidrop_80":
            assert abs(brute - want["avg"]) <= 0.1, row_id


def test_recomputed_figures_of_method_md():
    published = load_published()
    for row_id, value in (
        ("hidrop_64", 98.31),
        ("hidrop_48", 96.53),
        ("pdrop_64_trained", 94.23),
        ("fastv_64_trained", 91.75),
        ("fastv_64_training_free", 82.82),
        ("pdrop_80_trained", 96.74),
        ("table2_7b_pdrop", 100.22),
        ("table2_7b_hidrop", 98.62),
        ("table2_2.7b_pdrop", 96.32),
        ("table2_2.7b_hidrop", 94.77),
        ("pe_persistent", 97.82),
        ("pe_compacted", 96.95),
        ("pe_group", 97.07),
    ):
        assert published.recomputed_avg(published.row(row_id)) == pytest.approx(value, abs=0.005), row_id
    # the brute-force loop over the typed-in rows agrees with the file through the project's code
    assert _avg(HIDROP64, REF) == pytest.approx(published.recomputed_avg(published.row("hidrop_64")))


def test_hidrop_80_disagrees_with_its_own_row_and_says_so():
    published = load_published()
    row = published.row("hidrop_80")
    assert published.recomputed_avg(row) == pytest.approx(97.67, abs=0.005)
    assert row.avg_published == 98.4
    message = published.disagreement(row)
    assert message and "98.4" in message and "97.67" in message
    # every other row agrees with its printed Avg (%) to within 0.1
    others = [r for t in published.tables.values() for r in t.rows if r.id != "hidrop_80"]
    assert len(others) == 20
    for r in others:
        assert abs(published.recomputed_avg(r) - r.avg_published) <= AVG_TOLERANCE, r.id
        assert published.disagreement(r) is None


def test_every_row_of_section_11_is_in_the_file():
    published = load_published()
    assert {n: len(t.rows) for n, t in published.tables.items()} == {
        "table1": 12,
        "table2_7b": 3,
        "table2_2.7b": 3,
        "table10": 3,
    }
    assert {n: len(t.rows) for n, t in published.averages.items()} == {
        "table5": 3,
        "table7_injection": 7,
        "table7_exit": 7,
        "table11": 7,
    }
    assert published.row("llava15_7b_reference").scores == REF
    assert published.row("hidrop_64").scores == HIDROP64
    assert published.row("table2_7b_hidrop").scores == TABLE2_HIDROP
    t11 = {tuple(r.drop_layers): r.avg_published for r in published.averages["table11"].rows}
    assert t11[(10, 14, 16, 18)] == 98.3 and t11[(12, 15, 18, 21)] == 97.7
    exits = {r.exit_layer: r.avg_published for r in published.averages["table7_exit"].rows}
    assert exits == {22: 98.4, 23: 98.7, 24: 98.7, 25: 99.2, 26: 100.0, 27: 98.6, 28: 99.2}
    training = {r.id: r.training for r in published.tables["table1"].rows}
    assert training["pdrop_64_trained_eval_training_free"] == "trained_eval_training_free"
    assert training["fastv_48_training_free"] == "training_free" and training["hidrop_48"] == "trained"


# ---- matching a measured row ------------------------------------------------------------------------


def test_schedule_method_reads_the_structure():
    assert schedule_method(preset("vanilla")) == "vanilla"
    assert schedule_method(preset("fastv")) == "fastv"
    assert schedule_method(preset("pdrop")) == "pdrop"
    for name in ("hidrop_tok48", "hidrop_tok64", "hidrop_tok80", "hidrop_mobilellama"):
        assert schedule_method(preset(name)) == "hidrop"
    renamed = preset("pdrop").model_copy(update={"name": "my_schedule"})
    assert schedule_method(renamed) == "pdrop"  # not the name


def test_matches_by_method_budget_training_and_layout():
    published = load_published()

    def ids(*args, **kw):
        return [r.id for r in published.matches(*args, **kw)]

    assert ids("llava15_7b", "hidrop", preset("hidrop_tok64").avg_tokens()) == ["hidrop_64"]
    assert ids("llava15_7b", "hidrop", preset("hidrop_tok80").avg_tokens()) == ["hidrop_80"]  # 80.03 is 80
    assert ids("llava15_7b", "fastv", preset("fastv").avg_tokens()) == []  # 306 tokens: the paper has no such row
    assert ids("llava15_7b", "pdrop", preset("pdrop").avg_tokens()) == ["table2_7b_pdrop"]  # Table 2's row
    assert ids("llava15_7b", "fastv", 64) == ["fastv_64_training_free", "fastv_64_trained"]
    assert ids("llava15_7b", "fastv", 64, training="trained") == ["fastv_64_trained"]
    assert ids("llava15_7b", "pdrop", 64, training="training_free") == []
    assert ids("llava15_7b", "vanilla", 576, training="training_free") == ["llava15_7b_reference"]
    assert ids("llava15_7b", "hidrop", 64, layout="table2") == ["table2_7b_hidrop"]
    assert ids("llava15_7b", "hidrop", 64, layout="table10", position_mode="group") == ["pe_group"]
    mobile = preset("hidrop_mobilellama")
    assert mobile.avg_tokens() == pytest.approx(57.625)  # the paper prints 64 for this setting
    assert ids("mobilellama_2.7b", "hidrop", mobile.avg_tokens()) == []
    assert ids("mobilellama_2.7b", "hidrop", mobile.avg_tokens(), preset="hidrop_mobilellama") == ["table2_2.7b_hidrop"]
    assert ids("mobilellama_2.7b", "hidrop", 64) == ["table2_2.7b_hidrop"]
    assert ids("llava15_7b", "hidrop", 70) == []
    assert exact_preset("hidrop_mobilellama", mobile.describe()) == "hidrop_mobilellama"
    adjusted = preset("hidrop_tok64").model_copy(update={"exit_layer": 27})  # still named hidrop_tok64
    assert exact_preset(adjusted.name, adjusted.describe()) is None and exact_preset("custom", "576x32") is None
    assert same_budget(80.03, 80) and same_budget(265, 270) and not same_budget(306, 270) and not same_budget(62.5, 64)


def test_model_key():
    assert model_key("llava_hf", "/shared/models/llava-1.5-7b-hf") == "llava15_7b"
    assert model_key("llava_hf", "/mnt/runs/llava15_7b_hidrop_pretrain/export/final") == "llava15_7b"
    assert model_key("llava_hf", "llava-hf/llava-v1.5-7b") == "llava15_7b"
    assert model_key("llava_hf", "/models/llava-1.5-13b-hf") is None
    assert model_key("mini_llava", "llava-1.5-7b") is None  # only a llava_hf model is detected
    assert model_key("llava_hf", "/shared/models/llava-1.5-7b-hf", "none") is None
    assert model_key("tiny_llava", None, "mobilellama_2.7b") == "mobilellama_2.7b"  # marked by the user
    with pytest.raises(PublishedError, match="eval.published='gpt4' is not a published model"):
        model_key("llava_hf", None, "gpt4")


def test_compare_exact_deltas_and_partial_matches():
    published = load_published()
    measured = {**HIDROP64, "mme": 1480.3, "gqa": 59.0}
    c = compare(measured, REF, published.row("hidrop_64"))
    assert c.deltas["mme"] == pytest.approx(7.0) and c.deltas["gqa"] == pytest.approx(-1.5)
    assert all(c.deltas[b] == pytest.approx(0.0) for b in PAPER11 if b not in ("mme", "gqa"))
    assert c.measured_avg == pytest.approx(_avg(measured, REF))
    assert c.published_avg == pytest.approx(_avg(HIDROP64, REF))
    assert c.delta_avg == pytest.approx(_avg(measured, REF) - _avg(HIDROP64, REF))
    assert c.published_avg_printed == 98.3 and not c.partial and c.notes() == []
    # five benchmarks and one the paper does not have
    five = {b: HIDROP64[b] + 1.0 for b in ("mme", "mmbench", "gqa", "vizwiz", "textvqa")}
    c = compare({**five, "easy_vqa": 50.0}, {**REF, "easy_vqa": 60.0}, published.row("hidrop_64"))
    assert c.benchmarks == ["mme", "mmbench", "gqa", "vizwiz", "textvqa"]
    assert c.not_measured == ["mmbench_cn", "vqav2", "scienceqa_img", "pope", "seed_image", "mmstar"]
    assert c.not_published == ["easy_vqa"] and c.partial and c.published_avg_printed is None
    assert c.published_avg == pytest.approx(_avg({b: HIDROP64[b] for b in five}, REF))
    assert c.measured_avg == pytest.approx(_avg(five, REF))  # over the shared five only
    notes = " ".join(c.notes())
    assert "not measured here: MMB-CN, VQAv2" in notes and "no figure for easy_vqa" in notes
    # HiDrop 80 measured on all eleven: the comparison carries the paper's disagreement
    c = compare(published.row("hidrop_80").scores, REF, published.row("hidrop_80"))
    assert c.delta_avg == pytest.approx(0.0) and c.published_avg == pytest.approx(97.67, abs=0.005)
    assert c.published_avg_printed == 98.4 and "98.4" in c.disagreement
    assert comparisons_for(None, "hidrop", 64, measured, REF) == []
    # a benchmark the measured reference lacks is left out of both sides (the paper's row against itself: 0)
    c = compare(HIDROP64, {b: v for b, v in REF.items() if b != "mmstar"}, published.row("hidrop_64"))
    assert "mmstar" not in c.benchmarks and c.delta_avg == pytest.approx(0.0, abs=1e-9)
    # HiDrop 80 on five benchmarks only: the paper's disagreement is still said
    c = compare({b: published.row("hidrop_80").scores[b] for b in FIVE}, REF, published.row("hidrop_80"))
    assert c.partial and "98.4" in " ".join(c.notes())
    # Table 2's layout keeps a match with nothing scored (its cost figures); the others do not
    [c] = comparisons_for("llava15_7b", "hidrop", 64, {}, None, layout="table2")
    assert c.benchmarks == [] and c.row.train_gpu_hours == 94.4 and c.delta_avg is None
    assert comparisons_for("llava15_7b", "hidrop", 64, {}, None) == []


def test_paper_rows_show_the_printed_avg_when_it_differs():
    from hidrop.evaluation.paper import comparison_rows

    published = load_published()
    pdrop80 = compare(published.row("pdrop_80_trained").scores, REF, published.row("pdrop_80_trained")).to_dict()
    assert comparison_rows(pdrop80, PAPER11)[0][-1] == "96.7 (printed 96.8)"  # 96.74 recomputed
    hd64 = compare(HIDROP64, REF, published.row("hidrop_64")).to_dict()
    assert comparison_rows(hd64, PAPER11)[0][-1] == "98.3"
    hd80 = compare(published.row("hidrop_80").scores, REF, published.row("hidrop_80")).to_dict()
    assert comparison_rows(hd80, PAPER11)[0][-1] == "97.7 (printed 98.4)"


# ---- hidrop eval -------------------------------------------------------------------------------------


def _eval_report(scores_by_method: dict) -> EvalReport:
    """An `evaluate` report in the harness's layout at the LLaVA-1.5-7B shape, with hand-chosen scores."""
    methods = []
    for name, (kind, schedule, scores) in scores_by_method.items():
        methods.append(
            {
                "method": name,
                "kind": kind,
                "schedule": schedule.model_dump(mode="json"),
                "avg_vision_tokens": schedule.avg_tokens(),
                "vision_tflops": 0.1,
                "model_tflops": 1.0,
                "plan": "hand-written",
                "relative_score": relative_score(scores, scores_by_method["all_tokens"][2]),
                "benchmarks": {b: {"score": v, "samples": 10, "mode": "generate"} for b, v in scores.items()},
            }
        )
    return EvalReport.model_validate(
        {
            "experiment": "paper",
            "model": {"kind": "llava_hf", "num_layers": 32, "num_vision_tokens": 576},
            "mean_text_tokens": 64.0,
            "reference": "all_tokens",
            "methods": methods,
            "samples_evaluated": 100,
            "device": "cuda:0",
            "wall_time_s": 1.0,
            "notes": [],
            "benchmarks": [{"name": b, "samples": 10, "mode": "generate"} for b in scores_by_method["all_tokens"][2]],
        }
    )


def test_eval_shows_the_published_rows_with_exact_deltas(monkeypatch):
    from rich.console import Console

    from hidrop_platform.cli import views as cli
    from hidrop_platform.config.loader import validate_config
    from hidrop_platform.evaluate.runs import attach_published

    measured_ref = {b: v + 1.0 for b, v in REF.items()}
    measured_hidrop = {**HIDROP64, "mme": 1463.3}
    report = _eval_report(
        {
            "all_tokens": ("all_tokens", preset("vanilla"), measured_ref),
            "hidrop_tok64": ("schedule", preset("hidrop_tok64"), measured_hidrop),
            "fastv_k2_r50": ("schedule", preset("fastv"), {b: v - 5 for b, v in REF.items()}),
            "blind": ("blind", preset("vanilla"), {b: 1.0 for b in REF}),
        }
    )
    cfg = validate_config(
        {
            "name": "paper",
            "model": {"kind": "llava_hf", "path": "/shared/models/llava-1.5-7b-hf"},
            "schedule": {"preset": "hidrop_tok64"},
        }
    )
    attach_published(report, cfg)
    assert report.published_model == "llava15_7b"
    assert set(report.published) == {"all_tokens", "hidrop_tok64"}  # FastV at 306 tokens and blind: none
    [ref_row] = report.published["all_tokens"]
    assert ref_row["id"] == "llava15_7b_reference" and all(d == pytest.approx(1.0) for d in ref_row["deltas"].values())
    [hd] = report.published["hidrop_tok64"]
    assert hd["deltas"]["mme"] == pytest.approx(-10.0) and hd["deltas"]["gqa"] == pytest.approx(0.0)
    assert hd["delta_avg"] == pytest.approx(_avg(measured_hidrop, measured_ref) - _avg(HIDROP64, REF))
    json.dumps(report.to_dict())  # --json prints it as is

    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, width=400, color_system=None))
    cli.print_eval(report)
    text = buf.getvalue()
    assert "with the paper's rows for llava15_7b" in text
    assert "| ↳ paper: HiDrop Tok64, trained, 64 tokens | 1473.3 | 63.2 | 58.0 | 60.5 |" in text
    assert (
        f"| ↳ measured − paper | -10.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | "
        f"{hd['delta_avg']:+.1f} |" in text
    )
    assert "| ↳ paper: LLaVA-1.5-7B* (re-evaluated official checkpoint), 576 tokens | 1506.5 |" in text
    after_fastv = text.split("| fastv_k2_r50 |", 1)[1].splitlines()
    assert after_fastv[1].startswith("| blind |")  # no paper row under FastV at 306 tokens

    # marked "none": nothing
    report2 = _eval_report({"all_tokens": ("all_tokens", preset("vanilla"), measured_ref)})
    attach_published(report2, cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"published": "none"})}))
    assert report2.published == {} and report2.published_model is None
    # a training filter drops the trained HiDrop row (the paper has no training-free HiDrop)
    attach_published(
        report, cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"published_training": "training_free"})})
    )
    assert set(report.published) == {"all_tokens"}


def test_eval_cli_shows_nothing_when_no_row_matches(tmp_path):
    """A tiny model marked as LLaVA-1.5-7B: its 16-token budgets match no published row, so no paper rows."""
    from test_paper_benchmarks import write_pope_experiment
    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    exp = write_pope_experiment(tmp_path, "marked", eval_lines="  published: llava15_7b\n")
    result = CliRunner().invoke(app, ["eval", str(exp)])
    assert result.exit_code == 0, result.output
    assert "Table 1 layout" in result.output and "paper:" not in result.output
    result = CliRunner().invoke(app, ["eval", str(exp), "--json"])
    report = json.loads(result.output)
    assert report["published_model"] == "llava15_7b" and report["published"] == {}


def test_eval_published_is_validated(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hidrop_platform.cli",
            "validate",
            "experiments/mini_llava_eval.yaml",
            "eval.published=llava",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert done.returncode == 2 and len(lines) == 1
    assert "published='llava' is not a published model; choose from auto, none, llava15_7b" in lines[0]


# ---- hidrop report -----------------------------------------------------------------------------------

LLAVA = {"model.kind": "llava_hf", "model.path": "/shared/models/llava-1.5-7b-hf"}
SWEEP_REF = {**REF, "mme": 1500.0}  # the measured all-tokens model
SWEEP_HIDROP = {**HIDROP64, "mme": 1450.0, "pope": 87.4}


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory) -> dict:
    from hidrop_platform.tracking.store import default_tracking_uri, prepare
    from hidrop_platform.tracking.tracker import Tracker

    root = tmp_path_factory.mktemp("paper_store")
    uri = default_tracking_uri(root)
    prepare(uri, "paper")
    parent = Tracker(uri, "paper", run_name="sweep:p", tags={"hidrop.sweep": "p", "hidrop.kind": "sweep"}).start()
    parent.log_params(LLAVA)
    parent.log_metrics({f"reference/{b}": v for b, v in SWEEP_REF.items()}, step=0)
    trials = [
        ("seed:vanilla", "vanilla", 576.0, SWEEP_REF),
        ("seed:hidrop_tok64", "hidrop", 64.0, SWEEP_HIDROP),
        ("seed:fastv", "fastv", 306.0, {b: v - 3 for b, v in SWEEP_REF.items()}),
    ]
    for label, method, tokens, scores in trials:
        child = Tracker(
            uri, "paper", run_name=label, parent_run_id=parent.run_id, tags={"hidrop.sweep": "p", "hidrop.seed": "True"}
        ).start()
        child.log_params({**LLAVA, "schedule.method": method, "schedule.plan": label})
        child.log_metrics(
            {
                "relative_score": relative_score(scores, SWEEP_REF),
                "avg_vision_tokens": tokens,
                "vision_tflops": tokens / 576,
                **{f"score/{b}": v for b, v in scores.items()},
            },
            step=0,
        )
        child.set_tags({"status": "finished"})
        child.finish()
    parent.finish()
    five = ("mme", "mmbench", "gqa", "vizwiz", "textvqa")
    trained = {
        "train-vanilla": ("vanilla", "persistent", 576.0, {b: REF[b] for b in five}),
        "train-hidrop": ("hidrop", "persistent", 64.0, {**TABLE2_HIDROP, "gqa": 58.5}),
        "train-hidrop-compacted": ("hidrop", "compacted", 64.0, {**TABLE10_COMPACTED, "mme": 1400.0}),
    }
    for name, (method, mode, tokens, scores) in trained.items():
        run = Tracker(
            uri,
            "paper",
            run_name=name,
            tags={"hidrop.kind": "train", "stage": "finetune", "device_type": "cuda", "num_workers": "8"},
        ).start()
        # each position mode's finetune starts from its own stage-1 export: model.path differs
        run.log_params(
            {
                **LLAVA,
                "model.path": f"/runs/llava15_7b_{name}_pretrain/export/final",
                "name": name,
                "schedule.method": method,
                "schedule.preset": method,
                "schedule.resolved_position_mode": mode,
                "train.max_steps": 100,
            }
        )
        run.log_metrics(
            {
                "accelerator_hours": 1.0,
                "avg_vision_tokens": tokens,
                "loss": 1.0,
                **{f"score/{b}": v for b, v in scores.items()},
            },
            step=1,
        )
        run.finish()
    return {"uri": uri, "trained": trained}


def test_report_shows_published_rows_and_exact_deltas(paper_store, tmp_path):
    from hidrop_dashboards.report import build_report

    result = build_report(paper_store["uri"], "paper", tmp_path / "r", publish=False)
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["sweep"]["benchmarks"] == PAPER11  # the paper's column order
    rows = {r["method"]: r for r in saved["methods_table"]["rows"]}
    [ref] = rows["LLaVA (all tokens)"]["published"]
    assert ref["id"] == "llava15_7b_reference" and ref["deltas"]["mme"] == pytest.approx(-6.5)
    [hd] = rows["HiDrop Tok64"]["published"]
    assert hd["id"] == "hidrop_64"
    assert hd["deltas"]["mme"] == pytest.approx(1450.0 - 1473.3) and hd["deltas"]["pope"] == pytest.approx(1.0)
    assert hd["deltas"]["gqa"] == pytest.approx(0.0)
    assert hd["delta_avg"] == pytest.approx(_avg(SWEEP_HIDROP, SWEEP_REF) - _avg(HIDROP64, REF))
    assert rows["FastV"]["published"] == []  # 306 tokens: nothing shown

    # Table 2 layout: the paper's Table 2 rows under the trainings, scores against the all-tokens training
    train = {t["name"]: t for t in saved["training_table"]}
    [t2] = train["train-hidrop"]["published"]
    assert t2["id"] == "table2_7b_hidrop" and t2["train_gpu_hours"] == 94.4
    assert t2["deltas"] == pytest.approx({"mme": 0.0, "mmbench": 0.0, "gqa": -2.0, "vizwiz": 0.0, "textvqa": 0.0})
    measured = {**TABLE2_HIDROP, "gqa": 58.5}
    ref5 = {b: REF[b] for b in TABLE2_HIDROP}
    assert t2["delta_avg"] == pytest.approx(_avg(measured, ref5) - _avg(TABLE2_HIDROP, ref5))
    assert [c["id"] for c in train["train-vanilla"]["published"]] == ["table2_7b_vanilla"]

    # Table 10 layout: the two hidrop trainings differ only in position mode
    [group] = saved["position_tables"]
    assert [r["position_mode"] for r in group["rows"]] == ["compacted", "persistent"]
    compacted = group["rows"][0]
    [pe] = compacted["published"]
    assert pe["id"] == "pe_compacted" and pe["deltas"]["mme"] == pytest.approx(1400.0 - 1452.3)
    assert pe["not_measured"] == ["mmbench_cn", "vqav2", "scienceqa_img", "pope", "seed_image", "mmstar"]
    assert result["position_tables"] == 1 and result["published_rows"] == 2 + 3 + 2

    md = (tmp_path / "r" / "report.md").read_text()
    assert "| ↳ paper: HiDrop Tok64, trained, 64 tokens | 64 | 1473.3 |" in md
    assert (
        "| ↳ measured − paper | | -23.3 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +0.0 | +1.0 | +0.0 | +0.0 |" in md
    )
    assert "94.4 GPU-h (paper, full recipe)" in md and "gqa -2.0" in md
    assert "Position encodings (Table 10 layout)" in md and "not measured here: MMB-CN" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.count('<tr class="published">') == 7 and page.count('<tr class="delta">') == 7
    assert "tr.published td{color:#8a8a8a" in page  # the lighter style


def test_report_without_a_published_model_shows_none(paper_store, tmp_path):
    """The same store's rows are about an unnamed model when eval.published says none."""
    from hidrop_dashboards.report import build_report
    from hidrop_platform.tracking.store import default_tracking_uri, prepare
    from hidrop_platform.tracking.tracker import Tracker

    uri = default_tracking_uri(tmp_path)
    prepare(uri, "other")
    run = Tracker(uri, "other", run_name="train-hidrop", tags={"hidrop.kind": "train", "stage": "finetune"}).start()
    run.log_params({**LLAVA, "eval.published": "none", "schedule.method": "hidrop"})
    run.log_metrics({"avg_vision_tokens": 64.0, "accelerator_hours": 1.0, "score/mme": 1400.0}, step=1)
    run.finish()
    result = build_report(uri, "other", tmp_path / "r", publish=False)
    assert result["published_rows"] == 0
    assert "paper:" not in (tmp_path / "r" / "report.md").read_text()
