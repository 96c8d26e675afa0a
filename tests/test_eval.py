"""The evaluation harness: metrics against hand-computed cases, predictions against the stock model run
one sample at a time, baselines (blind, random, oracle), determinism, and `hidrop eval`."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hidrop.data import encode_sample, get_template
from hidrop.evaluation.harness import EvalError, _first_token_ids, evaluate
from hidrop.evaluation.metrics import evidence_recall, exact_match, normalize_answer, relative_score
from hidrop.evaluation.registry import Benchmark, get_benchmark, known_benchmarks
from hidrop.sample import Sample
from hidrop.schedule import DropEvent, Schedule, preset
from hidrop.tiny import tiny_vlm

COLOURS = ("red", "green", "blue", "yellow")


# ---- metrics ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,norm", [("Yes.", "yes"), ("  Red circle!\nmore", "red circle"), ("two,three", "two three"), ("", "")]
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("yes it is", "yes") == 0.0


def test_relative_score_hand_computed():
    # (50/100 + 80/80 + 30/60) / 3 * 100 = (0.5 + 1 + 0.5) / 3 * 100
    assert relative_score({"a": 50, "b": 80, "c": 30}, {"a": 100, "b": 80, "c": 60}) == pytest.approx(200 / 3)
    assert relative_score({"a": 50, "x": 1}, {"a": 100}) == pytest.approx(50.0)  # only shared benchmarks
    assert relative_score({"a": 50}, {"a": 0}) is None  # undefined ratio
    assert relative_score({}, {"a": 1}) is None


def test_evidence_recall():
    kept = [True, False, True, False]
    assert evidence_recall(kept, (0, 1)) == 0.5
    assert evidence_recall(kept, (0, 2)) == 1.0
    assert evidence_recall(kept, ()) is None


class _FirstLetterTokenizer:
    """Each word is one token: its first letter (so 'red' and 'rectangle' collide)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(text[0].lower())]


def test_first_token_collision_is_an_error():
    tok = _FirstLetterTokenizer()
    assert _first_token_ids(tok, ["yes", "no"]) == [[ord("y")], [ord("n")]]
    with pytest.raises(EvalError, match="'red' and 'rectangle'"):
        _first_token_ids(tok, ["red", "rectangle"])


# ---- a hand-made benchmark ------------------------------------------------------------------
def _square_image(colour: str, cell: int, grid: int = 4, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    step = size // grid
    r, c = divmod(cell, grid)
    im.paste(Image.new("RGB", (step, step), colour), (c * step, r * step))
    return im


class ColourBench(Benchmark):
    name = "colour_test"

    def __init__(self, n=10, **kw):
        super().__init__(**kw)
        self.n = n

    def load(self):
        out = []
        for i in range(self.n):
            colour, cell = COLOURS[i % 4], (i * 5) % 16
            out.append(
                Sample(
                    id=f"c{i}",
                    conversations=(
                        {"from": "human", "value": "<image>\nwhat color is the square ?"},
                        {"from": "gpt", "value": colour},
                    ),
                    image=_square_image(colour, cell),
                    answer=colour,
                    candidates=COLOURS,
                    family="even" if i % 2 == 0 else "odd",
                    evidence=(cell,),
                )
            )
        return out


SCHEDULE = Schedule(
    num_layers=8,
    num_vision_tokens=16,
    inject_layer=2,
    exit_layer=8,
    drops=(DropEvent(after_layer=3, keep=8), DropEvent(after_layer=5, keep=2)),
    name="test_hidrop",
)


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=3)


def _method(report, name):
    return report.method(name)


def test_closed_predictions_match_stock_model_one_sample_at_a_time(vlm):
    bench = ColourBench(n=7)
    report = evaluate(vlm, [SCHEDULE], [bench], batch_size=3, keep_predictions=True)
    preds = _method(report, "all_tokens").benchmarks["colour_test"].predictions
    tmpl = get_template("chatml")
    cand_ids = [vlm.tokenizer.encode(c, add_special_tokens=False)[0] for c in COLOURS]
    for s in bench.samples():
        enc = encode_sample(
            s, vlm.tokenizer, tmpl, image_token_id=vlm.image_token_id, num_image_tokens=16, for_generation=True
        )
        ids = torch.tensor([enc.input_ids])
        pixels = vlm.image_processor(s.load_image())[None]
        with torch.no_grad():
            logits = vlm.model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        assert preds[s.id] == COLOURS[int(logits[cand_ids].argmax())]


def test_generate_mode_matches_stock_greedy(vlm):
    bench = ColourBench(n=3)
    report = evaluate(
        vlm,
        [SCHEDULE],
        [bench],
        baselines=["all_tokens"],
        mode="generate",
        batch_size=3,
        max_new_tokens=4,
        keep_predictions=True,
    )
    preds = _method(report, "all_tokens").benchmarks["colour_test"].predictions
    tmpl = get_template("chatml")
    for s in bench.samples():
        enc = encode_sample(
            s, vlm.tokenizer, tmpl, image_token_id=vlm.image_token_id, num_image_tokens=16, for_generation=True
        )
        ids = torch.tensor([enc.input_ids])
        pixels = vlm.image_processor(s.load_image())[None]
        out = vlm.model.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=[vlm.tokenizer.eos_token_id, vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")],
        )
        assert preds[s.id] == vlm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_baselines_recall_and_costs(vlm):
    report = evaluate(vlm, [SCHEDULE], [ColourBench(n=12)], batch_size=5)
    names = [m.method for m in report.methods]
    assert names == ["all_tokens", "test_hidrop", "blind", "random", "oracle"]
    oracle, rnd = _method(report, "oracle"), _method(report, "random")
    # one evidence cell, keeps 8 then 2: the oracle always keeps it
    assert oracle.benchmarks["colour_test"].evidence_recall == [1.0, 1.0]
    r8, r2 = rnd.benchmarks["colour_test"].evidence_recall
    assert r2 <= r8 < 1.0 or r8 == 1.0  # random keeps fewer evidence cells after the second drop
    assert 0.0 <= r2 < 1.0
    blind = _method(report, "blind")
    assert blind.measured_avg_vision_tokens == 0.0 and blind.vision_tflops == 0.0
    assert 0 < blind.model_tflops < _method(report, "test_hidrop").model_tflops
    ref = _method(report, "all_tokens")
    assert ref.measured_avg_vision_tokens == 16.0
    hid = _method(report, "test_hidrop")
    assert hid.measured_avg_vision_tokens == pytest.approx(SCHEDULE.avg_tokens())
    assert hid.vision_tflops < ref.vision_tflops and hid.model_tflops < ref.model_tflops
    if ref.benchmarks["colour_test"].score > 0:
        assert ref.relative_score == pytest.approx(100.0)
    fam = ref.benchmarks["colour_test"]
    assert fam.score == pytest.approx((fam.figures()["family/even"] + fam.figures()["family/odd"]) / 2)
    assert report.samples_evaluated == 12


def test_deterministic_under_seed(vlm):
    runs = [
        evaluate(vlm, [SCHEDULE], [ColourBench(n=9)], batch_size=4, seed=7, keep_predictions=True) for _ in range(2)
    ]
    for a, b in zip(runs[0].methods, runs[1].methods):
        assert a.benchmarks == b.benchmarks
    other = evaluate(vlm, [SCHEDULE], [ColourBench(n=9)], batch_size=4, seed=8, baselines=["random"])
    assert (
        _method(other, "random").benchmarks["colour_test"].evidence_recall
        != _method(runs[0], "random").benchmarks["colour_test"].evidence_recall
    )


def test_predictions_do_not_depend_on_batch_size(vlm):
    a = evaluate(vlm, [SCHEDULE], [ColourBench(n=7)], batch_size=7, baselines=["all_tokens"], keep_predictions=True)
    b = evaluate(vlm, [SCHEDULE], [ColourBench(n=7)], batch_size=2, baselines=["all_tokens"], keep_predictions=True)
    for name in ("all_tokens", "test_hidrop"):
        assert (
            _method(a, name).benchmarks["colour_test"].predictions
            == _method(b, name).benchmarks["colour_test"].predictions
        )


def test_offline_benchmarks_registered_and_run(vlm):
    assert {"easy_vqa", "probes"} <= set(known_benchmarks())
    probes = get_benchmark("probes", limit=2)
    easy = get_benchmark("easy_vqa", limit=6)
    sched = preset("hidrop_tok64", 8, 16)
    report = evaluate(vlm, [sched, preset("fastv", 8, 16)], [easy, probes], batch_size=8)
    by_name = {b.name: b for b in report.benchmarks}
    assert by_name["easy_vqa"].samples == 6
    assert by_name["probes"].samples == 2 * 6  # per family
    oracle = _method(report, "oracle").benchmarks["probes"]
    assert "family/text" in oracle.figures() and oracle.evidence_recall is not None
    assert _method(report, "oracle").benchmarks["easy_vqa"].evidence_recall is None  # no evidence there


def test_probes_are_scored_but_not_averaged_into_the_relative_score_by_default(vlm):
    easy, probes = get_benchmark("easy_vqa", limit=6), get_benchmark("probes", limit=2)
    sched = preset("fastv", 8, 16)
    default = evaluate(vlm, [sched], [easy, probes], baselines=["blind"], batch_size=8, n_resamples=200)
    both = evaluate(
        vlm,
        [sched],
        [easy, probes],
        baselines=["blind"],
        batch_size=8,
        n_resamples=200,
        relative=["easy_vqa", "probes"],
    )
    ref, row = default.reference_row().scores(), _method(default, sched.name).scores()
    assert default.relative_over == ["easy_vqa"] and both.relative_over == ["easy_vqa", "probes"]
    assert _method(default, sched.name).relative_score == pytest.approx(
        relative_score({"easy_vqa": row["easy_vqa"]}, ref)
    )
    assert _method(both, sched.name).relative_score == pytest.approx(relative_score(row, ref))
    assert "probes" in _method(default, sched.name).benchmarks  # still scored, with its interval
    assert any(n.startswith("probes: scored, not in the relative score") for n in default.notes)
    assert not any("not in the relative score" in n for n in both.notes)
    with pytest.raises(EvalError, match="relative: mme not among the evaluated benchmarks"):
        evaluate(vlm, [sched], [easy], relative=["mme"])


def test_errors(vlm):
    with pytest.raises(EvalError, match="baseline"):
        evaluate(vlm, [SCHEDULE], [ColourBench(n=1)], baselines=["nope"])
    with pytest.raises(EvalError, match="6 layers"):
        evaluate(vlm, [preset("fastv", 6, 16)], [ColourBench(n=1)])
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("mmbench_imaginary")


# ---- the command ------------------------------------------------------------------------------
def _write(tmp_path, body: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(body)
    return p


TINY_EXP = """
name: tiny_eval
model: {kind: tiny_llava}
schedule: {preset: hidrop_tok64}
compare: [{preset: fastv}]
eval:
  benchmarks: [{name: easy_vqa, limit: 4}, {name: probes, limit: 1, options: {families: [attribute, counting]}}]
  batch_size: 4
"""


def test_eval_cli_json(tmp_path):
    from hidrop_platform.cli import app

    result = CliRunner().invoke(app, ["eval", str(_write(tmp_path, TINY_EXP)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples_evaluated"] == 4 + 2
    row = next(m for m in report["methods"] if m["method"] == "hidrop_tok64")
    for key in ("benchmarks", "relative_score", "avg_vision_tokens", "vision_tflops", "model_tflops"):
        assert key in row
    assert set(row["benchmarks"]) == {"easy_vqa", "probes"}
    assert report["wall_time_s"] > 0 and not math.isnan(report["mean_text_tokens"])


def test_eval_cli_table_and_errors(tmp_path):
    from hidrop_platform.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["eval", str(_write(tmp_path, TINY_EXP)), "eval.benchmarks.1.limit=1"])
    assert ok.exit_code == 0, ok.output
    assert "hidrop_tok64" in ok.output and "oracle" in ok.output and "probes/attribute" in ok.output
    bad = runner.invoke(app, ["eval", str(_write(tmp_path, TINY_EXP)), "eval.benchmarks.0.name=nope"])
    assert bad.exit_code == 2 and "unknown benchmark 'nope'" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["eval", str(_write(tmp_path, TINY_EXP)), "eval.benchmarks.1.options.max_size=500"])
    assert bad.exit_code == 2 and "probes" in bad.output and "Traceback" not in bad.output
    shape = runner.invoke(app, ["eval", str(_write(tmp_path, TINY_EXP)), "model.kind=shape"])
    assert shape.exit_code == 2 and "no weights" in shape.output


def test_schedule_named_like_a_baseline_keeps_both_rows(vlm):
    named = SCHEDULE.model_copy(update={"name": "oracle"})
    report = evaluate(vlm, [named], [ColourBench(n=4)], batch_size=4)
    names = [m.method for m in report.methods]
    assert len(names) == len(set(names)) and "oracle" in names
    assert _method(report, "oracle").benchmarks["colour_test"].evidence_recall == [1.0, 1.0]


class MixedBench(ColourBench):
    """First sample has no evidence, second has no image: recall and token counts must survive both."""

    def load(self):
        base = super().load()
        first = Sample(**{**base[0].__dict__, "evidence": ()})
        text_only = Sample(
            id="t",
            conversations=({"from": "human", "value": "what color is the square ?"},),
            answer="red",
            candidates=COLOURS,
        )
        return [first, text_only] + base[1:]


def test_recall_and_counts_with_evidence_less_and_text_only_samples(vlm):
    report = evaluate(vlm, [SCHEDULE], [MixedBench(n=6)], batch_size=4)
    assert _method(report, "oracle").benchmarks["colour_test"].evidence_recall == [1.0, 1.0]
    assert _method(report, "all_tokens").measured_avg_vision_tokens == 16.0


# ---- reused records: a sweep's stored reference, a trial's earlier rungs -----------------------------
def test_stored_reference_pairs_a_trial_exactly_like_a_joint_run(vlm):
    from hidrop.evaluation.harness import known_records

    bench = ColourBench(n=12)
    joint = evaluate(vlm, [SCHEDULE], [bench], baselines=["blind"], batch_size=4, keep_records=True, n_resamples=300)
    vanilla = Schedule(num_layers=8, num_vision_tokens=16)
    stored = known_records(evaluate(vlm, [vanilla], [bench], baselines=["blind"], batch_size=4, keep_records=True))
    assert set(stored) == {"all_tokens", "blind"}
    trial = evaluate(
        vlm, [SCHEDULE], [bench], baselines=["blind"], batch_size=4, keep_records=True, known=stored, n_resamples=300
    )
    # only the schedule ran: 12 questions, 3 batches; the stored rows are marked reused
    assert trial.questions_run == 12 and trial.batches_run == 3 and joint.questions_run == 36
    assert trial.method("all_tokens").reused and trial.method("blind").reused
    assert not trial.method("test_hidrop").reused
    a, b = joint.method("test_hidrop"), trial.method("test_hidrop")
    assert a.scores() == b.scores() and a.relative_score == pytest.approx(b.relative_score)
    assert a.relative_interval == pytest.approx(b.relative_interval)
    assert (a.like_blind, a.above_blind) == (b.like_blind, b.above_blind)
    rows = list(trial.record_rows(methods=["test_hidrop"]))
    assert {r["method"] for r in rows} == {"test_hidrop"} and len(rows) == 12


def test_rungs_never_score_a_question_twice_and_end_where_a_full_run_ends(vlm):
    from hidrop.evaluation.harness import known_records

    bench = ColourBench(n=12)
    full = evaluate(vlm, [SCHEDULE], [bench], baselines=[], batch_size=4, keep_records=True, n_resamples=0)
    known = {}
    seen = 0
    for size in (3, 6, 12):  # rung r scores questions [0, size); the earlier ones come from `known`
        rung = evaluate(
            vlm,
            [SCHEDULE],
            [bench],
            baselines=[],
            batch_size=4,
            keep_records=True,
            n_resamples=0,
            known=known,
            select=lambda b, samples, size=size: samples[:size],
        )
        assert rung.questions_run == 2 * (size - seen)  # all tokens and the schedule, new questions only
        assert rung.benchmarks[0].samples == size
        seen = size
        known = known_records(rung)
    assert rung.method("test_hidrop").scores() == full.method("test_hidrop").scores()
    assert rung.method("all_tokens").scores() == full.method("all_tokens").scores()
