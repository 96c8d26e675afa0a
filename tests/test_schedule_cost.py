"""Schedules, presets and cost accounting against the figures of method.md (sections 1 and 7)."""

from pathlib import Path

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


def _readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start : end if end > 0 else None]


def _cells_agree(readme: str, printed: str) -> bool:
    """A README figure matches the printed one at the README's precision (`100` for `100.0`)."""
    try:
        return float(readme) == round(float(printed), len(readme.partition(".")[2]))
    except ValueError:
        return readme == printed


def test_readme_cost_table_is_what_hidrop_flops_prints(monkeypatch):
    """The README's cost table, recomputed by `hidrop flops --json` on the command the README shows: the
    figures cannot drift from the code again (the whole-model column once did, e.g. Tok64 1.050 vs 1.060)."""
    import itertools
    import json
    import re

    from typer.testing import CliRunner

    from hidrop_platform.cli import app

    section = _readme_section("### The paper's cost table")
    command = re.search(r"hidrop flops (\S+)", section).group(1)
    head, options, tail = re.fullmatch(r"(.*)\{(.*)\}(.*)", command).groups()
    files = [head + o + tail for o in options.split(",")]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    done = CliRunner().invoke(app, ["flops", *files, "--json"])
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)["schedules"]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|") and not line.startswith(("|---", "| schedule"))
    ]
    assert len(rows) == len(printed) == len(files)
    for row, r in itertools.zip_longest(rows, printed):
        _, plan, avg, vision, pct, whole = row
        assert plan == r["plan"], (row, r)
        for cell, key in ((avg, "avg_vision_tokens"), (vision, "vision_tflops"), (pct, "vision_pct_of_vanilla")):
            assert _cells_agree(cell, str(r[key])), (row[0], key, cell, r[key])
        assert _cells_agree(whole, str(r["model_tflops"])), (row[0], "model_tflops", whole, r["model_tflops"])


def test_readme_mini_recipe_token_counts_are_the_configs():
    """The mini recipe table's avg vision tokens where the config fixes them (all but HiDrop's, which the
    training learns): the figure `hidrop flops` prints for each experiment."""
    import re

    from hidrop_platform.config.loader import load_config

    root = Path(__file__).resolve().parents[1]
    section = _readme_section("**Recipe** (`experiments/mini_llava_tok64_")
    rows = re.findall(r"^\| `(mini_llava_tok64_\w+)` \|.*\| ([\d.]+) \|$", section, re.M)
    assert len(rows) == 4
    for name, avg in rows:
        if name.endswith("_hidrop"):
            continue  # learned keeps (the trained checkpoint's), not the config's
        cfg = load_config(root / "experiments" / f"{name}.yaml")
        report = cost_report(cfg.main_schedule, cfg.model.shape)
        assert _cells_agree(avg, str(report["avg_vision_tokens"])), (name, avg, report["avg_vision_tokens"])
