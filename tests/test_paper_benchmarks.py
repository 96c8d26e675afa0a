"""The paper's eleven benchmarks: small fixture files in each release's layout, loaders and official
metrics checked against hand-computed values (VQA normalization, POPE yes-ratio, MME acc+ pairs, MMBench
CircularEval), the paper's Avg(%) recomputed from its Table 1, and one benchmark through the harness."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from hidrop.evaluation.metrics import relative_score
from hidrop.evaluation.official import (
    circular_accuracy,
    gqa_match,
    mme_scores,
    normalize_vqa,
    option_letter,
    parse_yes_no,
    pope_metrics,
    rotate_options,
    vqa_accuracy,
)
from hidrop.evaluation.paper import CHOICE, CHOICE_CN, SHORT_ANSWER, paper_table
from hidrop.evaluation.registry import get_benchmark


def _png(path=None, colour=(200, 30, 30)):
    image = Image.new("RGB", (8, 8), colour)
    if path is None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


# ---- official rules on hand-computed cases ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("yes!", "yes"),
        ("Yes.", "yes"),
        ("1,000", "1000"),
        ("black/white", "black white"),
        ("3.5", "3.5"),
        ("2.", "2"),
        ("dont", "don't"),
        ("it's red", "it's red"),
        ("  left\n", "left"),
        ("(a) car", "car"),
    ],
)
def test_vqa_normalization(raw, normal):
    assert normalize_vqa(raw) == normal


def test_vqa_accuracy_leave_one_out():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    # ten leave-one-out subsets: leaving out a "2" leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("2", ["2"] * 2 + ["1"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] + ["1"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("unanswerable", ["unanswerable"]) == 1.0


def test_gqa_and_yes_no_and_options():
    assert gqa_match("Left.", "left") == 1.0 and gqa_match("the left", "left") == 0.0
    assert [parse_yes_no(t) for t in ("Yes", "No.", "There is no dog.", "Yes, there is not a cat", "yes it is")] == [
        "yes",
        "no",
        "no",
        "no",
        "yes",
    ]
    options = {"A": "dog", "B": "cat", "C": "two birds"}
    assert [
        option_letter(t, options) for t in ("B", "B.", "(C)", "C) two birds", "Answer: A", "cat", "2 birds", "maybe")
    ] == ["B", "B", "C", "C", "A", "B", "C", None]


def test_pope_metrics_by_hand():
    preds = ["Yes", "yes", "No", "No, there is not", "Yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    # tp = 2 (1, 5), fp = 1 (2), fn = 1 (3), tn = 2 (4, 6)
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3) and m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["yes_ratio"] == pytest.approx(100 * 3 / 6)


def test_mme_acc_plus_pairs():
    records = [
        ("existence", "a", True),
        ("existence", "a", True),  # both right
        ("existence", "b", True),
        ("existence", "b", False),  # one right
        ("count", "c", False),
        ("count", "c", False),
        ("commonsense_reasoning", "d", True),
        ("commonsense_reasoning", "d", True),
    ]
    m = mme_scores(records)
    assert m["existence/acc"] == 75.0 and m["existence/acc_plus"] == 50.0 and m["existence"] == 125.0
    assert m["count"] == 0.0
    assert m["perception"] == 125.0 and m["cognition"] == 200.0


def test_circular_rotation_and_accuracy():
    options = {"A": "dog", "B": "cat", "C": "cow", "D": "pig"}
    seen = set()
    for k in range(4):
        rotated, answer = rotate_options(options, "C", k)
        assert rotated[answer] == "cow" and sorted(rotated.values()) == sorted(options.values())
        seen.add(answer)
    assert seen == {"A", "B", "C", "D"}  # the right answer visits every letter
    assert circular_accuracy({1: [True, True, True, True], 2: [True, False], 3: [True]}) == pytest.approx(200 / 3)


# ---- loaders on fixture files ----------------------------------------------------------------------


def test_vqav2_textvqa_vizwiz_gqa_loaders(tmp_path):
    root = tmp_path / "vqav2"
    _png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"questions": [{"question_id": 7, "image_id": 42, "question": "How many dogs?"}]})
    )
    (root / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "2"}] * 9 + [{"answer": "3"}]}]})
    )
    bench = get_benchmark("vqav2", root=str(root))
    [s] = bench.samples()
    assert s.question() == f"How many dogs?\n{SHORT_ANSWER}" and s.load_image().size == (8, 8)
    assert bench.score(s, "two") == pytest.approx(1.0) and bench.score(s, "3") == pytest.approx(0.3)

    root = tmp_path / "textvqa"
    _png(root / "train_images" / "abc.jpg")
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps(
            {"data": [{"question_id": 1, "image_id": "abc", "question": "What brand?", "answers": ["Nike"] * 10}]}
        )
    )
    [s] = get_benchmark("textvqa", root=str(root)).samples()
    assert s.meta["answers"] == ["Nike"] * 10 and get_benchmark("textvqa", root=str(root)).score(s, "nike") == 1.0

    root = tmp_path / "vizwiz"
    _png(root / "val" / "VizWiz_val_00000001.jpg")
    (root / "val.json").write_text(
        json.dumps(
            [
                {
                    "image": "VizWiz_val_00000001.jpg",
                    "question": "What is this?",
                    "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                }
            ]
        )
    )
    [s] = get_benchmark("vizwiz", root=str(root)).samples()
    assert "Unanswerable" in s.question() and get_benchmark("vizwiz", root=str(root)).score(s, "Unanswerable") == 1.0

    root = tmp_path / "gqa"
    _png(root / "images" / "n123.jpg")
    (root / "testdev_balanced_questions.json").write_text(
        json.dumps(
            {
                "q1": {"imageId": "n123", "question": "Which side?", "answer": "left"},
                "q2": {"imageId": "n123", "question": "Is it red?", "answer": "yes"},
            }
        )
    )
    gqa = get_benchmark("gqa", root=str(root), limit=1)
    assert [s.id for s in gqa.samples()] == ["q1"] and gqa.score(gqa.samples()[0], "Left") == 1.0


def test_pope_loader_and_yes_ratio(tmp_path):
    root = tmp_path / "pope"
    _png(root / "val2014" / "COCO_val2014_000000000001.jpg")
    for split, labels in (("random", ["yes", "no", "no"]), ("adversarial", ["yes", "yes"])):
        lines = [
            json.dumps(
                {
                    "question_id": i,
                    "image": "COCO_val2014_000000000001.jpg",
                    "text": f"Is there a dog in the image? ({i})",
                    "label": lab,
                }
            )
            for i, lab in enumerate(labels)
        ]
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines))
    bench = get_benchmark("pope", root=str(root), splits="random,adversarial")
    samples = bench.samples()
    assert [s.family for s in samples] == ["random"] * 3 + ["adversarial"] * 2
    preds = ["Yes", "Yes", "No", "Yes", "No"]
    agg = bench.aggregate(samples, [bench.score(s, p) for s, p in zip(samples, preds)])
    assert agg["random/yes_ratio"] == pytest.approx(100 * 2 / 3) and agg["random/accuracy"] == pytest.approx(
        100 * 2 / 3
    )
    assert agg["adversarial/yes_ratio"] == 50.0 and agg["adversarial/recall"] == 50.0
    # random: tp 1, fp 1 -> P = R... F1 = 2 * 0.5 * 1 / 1.5; adversarial: P 1, R 0.5 -> F1 2/3
    assert agg["random/f1"] == pytest.approx(100 * 2 / 3) and agg["adversarial/f1"] == pytest.approx(100 * 2 / 3)
    assert agg["score"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(FileNotFoundError, match=r"split 'popular' not found at .*coco_pope_popular.json"):
        get_benchmark("pope", root=str(root)).samples()


def test_mme_loader_both_layouts_and_score(tmp_path):
    root = tmp_path / "MME"
    # flat layout (image and txt side by side) and the questions_answers_YN layout
    _png(root / "existence" / "1.jpg")
    (root / "existence" / "1.txt").write_text("Is there a dog?\tYes\nIs there a cat?\tNo\n")
    _png(root / "existence" / "2.jpg")
    (root / "existence" / "2.txt").write_text("Is there a car?\tYes\nIs there a bus?\tNo\n")
    _png(root / "OCR" / "images" / "a.png")
    (root / "OCR" / "questions_answers_YN").mkdir(parents=True)
    (root / "OCR" / "questions_answers_YN" / "a.txt").write_text("Does it say STOP?\tYes\nDoes it say GO?\tNo\n")
    bench = get_benchmark("mme", root=str(root), categories="existence,OCR")
    samples = bench.samples()
    assert len(samples) == 6 and samples[0].question() == "Is there a dog?" and samples[0].answer == "yes"
    preds = ["Yes", "No", "Yes", "Yes", "No", "No"]  # existence: image 1 both, image 2 one; OCR: one
    agg = bench.aggregate(samples, [bench.score(s, p) for s, p in zip(samples, preds)])
    assert agg["existence"] == pytest.approx(75 + 50) and agg["OCR"] == pytest.approx(50 + 0)
    assert agg["score"] == pytest.approx(175.0)
    with pytest.raises(FileNotFoundError, match="category 'count' not found"):
        get_benchmark("mme", root=str(root)).samples()


def test_mmbench_circular_from_tsv(tmp_path):
    img = _png()
    rows = [
        {
            "index": 0,
            "question": "What animal?",
            "hint": "A farm.",
            "A": "dog",
            "B": "cat",
            "C": "cow",
            "D": "pig",
            "answer": "C",
            "category": "recognition",
            "image": img,
        },
        {
            "index": 1,
            "question": "Is it day?",
            "hint": "nan",
            "A": "yes",
            "B": "no",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "reasoning",
            "image": img,
        },
    ]
    _tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    bench = get_benchmark("mmbench", root=str(tmp_path))
    samples = bench.samples()
    assert len(samples) == 4 + 2  # every rotation of each question's options
    first = samples[0].question()
    assert first.startswith("A farm.\nWhat animal?\nA. dog\nB. cat") and first.endswith(CHOICE)
    assert "nan" not in samples[4].question() and samples[4].load_image().size == (8, 8)
    # answer every rotation of question 0 right and one rotation of question 1 wrong: 50%
    preds = [s.meta["options"][s.answer] for s in samples[:4]] + [
        samples[4].answer,
        "B" if samples[5].answer == "A" else "A",
    ]
    agg = bench.aggregate(samples, [bench.score(s, p) for s, p in zip(samples, preds)])
    assert agg["score"] == 50.0 and agg["category/recognition"] == 100.0 and agg["category/reasoning"] == 0.0
    # without CircularEval, one pass
    assert len(get_benchmark("mmbench", root=str(tmp_path), circular="false").samples()) == 2
    # a TSV that already holds the rotations (index + k * 1e6) is grouped, not expanded again
    _tsv(tmp_path / "expanded.tsv", [dict(rows[1]), dict(rows[1], index=1_000_001, A="no", B="yes", answer="B")])
    expanded = get_benchmark("mmbench", root=str(tmp_path), tsv="expanded.tsv")
    samples = expanded.samples()
    assert len(samples) == 2 and {s.meta["group"] for s in samples} == {1}
    agg = expanded.aggregate(samples, [expanded.score(s, p) for s, p in zip(samples, ["A", "A"])])
    assert agg["score"] == 0.0
    _tsv(tmp_path / "mmbench_dev_cn_20231003.tsv", rows)
    assert get_benchmark("mmbench_cn", root=str(tmp_path)).samples()[0].question().endswith(CHOICE_CN)


def test_scienceqa_seed_mmstar_loaders(tmp_path):
    root = tmp_path / "sqa"
    _png(root / "images" / "test" / "5" / "image.png")
    (root / "problems.json").write_text(
        json.dumps(
            {
                "5": {
                    "question": "Which is a mammal?",
                    "choices": ["shark", "whale"],
                    "answer": 1,
                    "image": "image.png",
                    "hint": "Look at the picture.",
                    "subject": "natural science",
                },
                "6": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "image": None, "hint": ""},
            }
        )
    )
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"]}))
    bench = get_benchmark("scienceqa_img", root=str(root))
    [s] = bench.samples()  # the IMG subset only
    assert (
        s.answer == "B"
        and s.question() == f"Context: Look at the picture.\nWhich is a mammal?\nA. shark\nB. whale\n{CHOICE}"
    )
    assert bench.score(s, "B") == 1.0 and bench.score(s, "whale") == 1.0 and bench.score(s, "A") == 0.0

    root = tmp_path / "seed"
    _png(root / "SEED-Bench-image" / "x.jpg")
    (root / "SEED-Bench.json").write_text(
        json.dumps(
            {
                "questions": [
                    {
                        "question_id": "1",
                        "question": "What colour?",
                        "choice_a": "red",
                        "choice_b": "blue",
                        "choice_c": "green",
                        "choice_d": "white",
                        "answer": "A",
                        "data_type": "image",
                        "data_id": "x.jpg",
                        "question_type_id": 3,
                    },
                    {
                        "question_id": "2",
                        "question": "Video?",
                        "choice_a": "a",
                        "choice_b": "b",
                        "choice_c": "c",
                        "choice_d": "d",
                        "answer": "B",
                        "data_type": "video",
                        "data_id": "v.mp4",
                    },
                ]
            }
        )
    )
    seed = get_benchmark("seed_image", root=str(root))
    [s] = seed.samples()
    assert s.answer == "A" and seed.score(s, "A") == 1.0 and seed.score(s, "red") == 1.0

    root = tmp_path / "mmstar"
    root.mkdir()
    _tsv(
        root / "MMStar.tsv",
        [
            {
                "index": 0,
                "question": "Which? Options: A: x, B: y, C: z, D: w",
                "answer": "D",
                "category": "coarse perception",
                "l2_category": "x",
                "image": _png(),
            }
        ],
    )
    star = get_benchmark("mmstar", root=str(root))
    [s] = star.samples()
    assert star.score(s, "D") == 1.0 and star.score(s, "(D)") == 1.0 and star.score(s, "A") == 0.0


def test_missing_files_name_the_benchmark_and_path(tmp_path):
    for name, message in (
        ("vqav2", "questions not found at"),
        ("mmbench", "tsv not found at"),
        ("scienceqa_img", "problems not found at"),
        ("mmstar", "tsv not found at"),
    ):
        with pytest.raises(FileNotFoundError, match=message + " " + str(tmp_path / "nothing")):
            get_benchmark(name, root=str(tmp_path / "nothing")).samples()
    with pytest.raises(FileNotFoundError, match="set `root`"):
        get_benchmark("gqa").samples()
    with pytest.raises(TypeError, match="unknown option"):
        get_benchmark("gqa", root=str(tmp_path), question="x.json")
    # through `hidrop eval`: one line naming the benchmark and the path
    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""name: missing
model: {{kind: tiny_llava}}
schedule: {{preset: hidrop_tok64}}
eval:
  benchmarks:
    - {{name: gqa, options: {{root: {tmp_path / "gqa_data"}}}}}
  baselines: []
  mode: generate
""")
    result = CliRunner().invoke(app, ["eval", str(exp)])
    assert result.exit_code == 2, result.output
    assert (
        f"benchmark 'gqa': questions not found at {tmp_path / 'gqa_data' / 'testdev_balanced_questions.json'}"
        in result.output
    )


# ---- the paper's Avg(%) ----------------------------------------------------------------------------


def test_paper_table_layout():
    rows = {"base": {"mme": 1500.0, "gqa": 60.0, "pope": 80.0}, "half": {"mme": 750.0, "gqa": 30.0, "pope": 80.0}}
    table = paper_table(rows, reference="base")
    assert table.splitlines()[0] == "| method | MME | GQA | POPE | Avg (%) |"
    assert "| half | 750.0 | 30.0 | 80.0 | 66.7 |" in table  # (50 + 50 + 100) / 3
    assert relative_score(rows["half"], rows["base"]) == pytest.approx(200 / 3)


def test_through_the_harness_with_their_own_aggregates(tmp_path):
    """A tiny model answers fixture MMBench and POPE questions through the harness (generation, greedy):
    the reported figures equal the benchmarks' own aggregates recomputed from the kept predictions."""
    from hidrop.evaluation.harness import evaluate
    from hidrop.schedule import preset
    from hidrop.tiny import tiny_vlm

    img = _png()
    _tsv(
        tmp_path / "mmbench_dev_20230712.tsv",
        [
            {
                "index": i,
                "question": "What colour?",
                "hint": "nan",
                "A": "red",
                "B": "blue",
                "C": "green",
                "D": "",
                "answer": "A",
                "category": "colour",
                "image": img,
            }
            for i in range(2)
        ],
    )
    _png(tmp_path / "val2014" / "x.jpg")
    (tmp_path / "coco_pope_random.json").write_text(
        "\n".join(
            json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab})
            for i, lab in enumerate(["yes", "no", "no"])
        )
    )
    benches = [get_benchmark("mmbench", root=str(tmp_path)), get_benchmark("pope", root=str(tmp_path), splits="random")]
    vlm = tiny_vlm(seed=1)
    report = evaluate(
        vlm,
        [preset("hidrop_tok64", vlm.num_layers, vlm.num_vision_tokens)],
        benches,
        baselines=["all_tokens"],
        mode="generate",
        max_new_tokens=3,
        batch_size=4,
        keep_predictions=True,
    )
    for method in report.methods:
        for bench in benches:
            entry = method.benchmarks[bench.name]
            samples = bench.samples()
            scores = [bench.score(s, entry.predictions[s.id]) for s in samples]
            assert entry.score == pytest.approx(bench.aggregate(samples, scores)["score"], nan_ok=True)
    assert len(benches[0].samples()) == 2 * 3  # two questions, three options, every rotation


def write_pope_experiment(tmp_path, name: str, eval_lines: str = ""):
    """A tiny-model experiment on a two-question fixture POPE split (also used by test_published)."""
    _png(tmp_path / "pope" / "val2014" / "x.jpg")
    (tmp_path / "pope" / "coco_pope_random.json").write_text(
        "\n".join(
            json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab})
            for i, lab in enumerate(["yes", "no"])
        )
    )
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""name: {name}
model: {{kind: tiny_llava}}
schedule: {{preset: hidrop_tok64}}
eval:
{eval_lines}  benchmarks:
    - {{name: pope, options: {{root: {tmp_path / "pope"}, splits: random}}}}
  baselines: [all_tokens]
  mode: generate
  max_new_tokens: 2
""")
    return exp


def test_hidrop_eval_prints_the_paper_layout(tmp_path):
    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    exp = write_pope_experiment(tmp_path, "paper_layout")
    result = CliRunner().invoke(app, ["eval", str(exp)])
    assert result.exit_code == 0, result.output
    assert "Table 1 layout" in result.output and "| method | POPE | Avg (%) |" in result.output
    assert "| all_tokens |" in result.output
