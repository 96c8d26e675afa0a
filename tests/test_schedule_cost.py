"""Schedules, presets and cost accounting against the figures of method.md (sections 1 and 7)."""

import pytest
from pydantic import ValidationError

from hidrop.cost import ModelShape, cost_report, vision_tflops
from hidrop.schedule import DropEvent, Schedule, hidrop_mobilellama, preset

SHAPE_7B = ModelShape()

# method.md section 1 (runs of n_l) and section 7 (avg tokens, TFLOPs, % of vanilla)
TABLE = {
    "vanilla": ("576x32", 576.0, 3.817, 100.0),
    "pdrop": ("576x8, 288x8, 144x8, 72x8", 270.0, 1.777, 46.6),
    "fastv": ("576x2, 288x30", 306.0, 2.007, 52.6),
    "hidrop_tok64": ("0x8, 576x2, 215x4, 10x2, 5x2, 1x6, 0x8", 64.00, 0.421, 11.0),
    "hidrop_tok48": ("0x8, 576x2, 87x4, 10x2, 5x2, 1x6, 0x8", 48.00, 0.317, 8.3),
    "hidrop_tok80": ("0x8, 576x2, 453x3, 10x3, 5x3, 1x5, 0x8", 80.03, 0.529, 13.9),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_reproduce_method_tables(name):
    runs, avg, tflops, pct = TABLE[name]
    s = preset(name, 32, 576)
    assert s.describe() == runs
    assert round(s.avg_tokens(), 2) == avg
    report = cost_report(s, SHAPE_7B)
    assert f"{report['vision_tflops']:.3f}" == f"{tflops:.3f}"
    assert round(report["vision_pct_of_vanilla"], 1) == pct


def test_per_layer_counts_are_explicit():
    s = preset("hidrop_tok64")
    counts = s.tokens_per_layer()
    assert counts[:8] == [0] * 8 and counts[8:10] == [576, 576] and counts[10:14] == [215] * 4
    assert counts[14:16] == [10, 10] and counts[16:18] == [5, 5] and counts[18:24] == [1] * 6 and counts[24:] == [0] * 8
    assert sum(counts) == 2048


def test_mobilellama_setting_and_paper_table2_for_2_7b():
    s = hidrop_mobilellama()
    assert (s.inject_layer, s.exit_layer, [d.after_layer for d in s.drops]) == (15, 28, [16, 19, 22, 25])
    shape = ModelShape(hidden_size=2560, intermediate_size=6912)
    # paper Table 2 (2.7B): vanilla 1.52T
    assert f"{vision_tflops(preset('vanilla'), shape):.2f}" == "1.52"


def test_whole_model_flops_exceed_vision_only_and_shrink_with_tokens():
    vanilla, hidrop = cost_report(preset("vanilla"), SHAPE_7B), cost_report(preset("hidrop_tok64"), SHAPE_7B)
    assert vanilla["model_tflops"] > vanilla["vision_tflops"]
    assert hidrop["model_tflops"] < vanilla["model_tflops"]
    # text rows, vision encoder and LM head are not pruned: the honest ratio is far below the vision-only one
    assert vanilla["model_tflops"] / hidrop["model_tflops"] < vanilla["vision_tflops"] / hidrop["vision_tflops"]


@pytest.mark.parametrize("depth", [4, 8, 12, 18, 24, 30, 40, 64])
@pytest.mark.parametrize("name", list(TABLE) + ["hidrop_mobilellama"])
def test_presets_scale_to_any_depth(name, depth):
    s = preset(name, depth, 196)
    assert s.num_layers == depth and len(s.tokens_per_layer()) == depth
    counts = [c for c in s.tokens_per_layer() if c]
    assert counts == sorted(counts, reverse=True) and max(counts) == 196  # never grows, starts full


@pytest.mark.parametrize("name", list(TABLE) + ["hidrop_mobilellama"])
def test_presets_at_tiny_token_counts_and_every_depth(name):
    for tokens in (1, 2, 3, 5, 6, 17):
        for depth in range(2, 70, 3):
            s = preset(name, depth, tokens)
            assert s.num_vision_tokens == tokens and all(k < tokens for k in s.keep_counts)


def test_scaling_keeps_stage_widths():
    s = preset("hidrop_tok64", 30, 196)
    assert s.describe() == "0x8, 196x2, 73x4, 3x2, 2x1, 1x6, 0x7"  # two full-resolution layers, as at 32


def test_scaling_keeps_relative_depth():
    s = preset("hidrop_tok64", 64, 576)
    assert (s.inject_layer, s.exit_layer) == (17, 49)
    assert [d.after_layer for d in s.drops] == [20, 28, 32, 36]
    assert s.keep_counts == [215, 10, 5, 1]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(inject_layer=20, exit_layer=10), "exit_layer=10 must come after inject_layer=20"),
        (dict(inject_layer=9, exit_layer=25, drops=[DropEvent(after_layer=5, keep=10)]), "outside the vision window"),
        (dict(drops=[DropEvent(after_layer=5, keep=10), DropEvent(after_layer=9, keep=20)]), "keep counts decrease"),
        (dict(drops=[DropEvent(after_layer=5, keep=700)]), "larger than the number of vision tokens"),
        (dict(exit_layer=40), "beyond the model depth"),
        (dict(drops=[DropEvent(after_layer=35, keep=1)]), "beyond the model depth"),
        (dict(drops=[DropEvent(after_layer=5, keep=10, score_layer=9)]), "score_layer=9"),
        (
            dict(drops=[DropEvent(after_layer=8, keep=10), DropEvent(after_layer=8, keep=5)]),
            "must be after the previous drop",
        ),
    ],
)
def test_impossible_schedules_are_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        Schedule(num_layers=32, num_vision_tokens=576, **fields)


def test_drop_event_needs_exactly_one_keep():
    with pytest.raises(ValidationError, match="exactly one of keep / keep_ratio"):
        DropEvent(after_layer=3, keep=5, keep_ratio=0.5)
    with pytest.raises(ValidationError, match="exactly one"):
        DropEvent(after_layer=3)
