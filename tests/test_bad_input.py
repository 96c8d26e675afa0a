"""Bad input, table-driven: every case must end in exit status 2 with ONE line naming the problem, no
traceback, and nothing written. The next case costs one row."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from planted import Planted
from typer.testing import CliRunner

from hidrop_platform.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "tiny_train_smoke.yaml")
ANALYZE = str(ROOT / "experiments" / "mini_llava_analyze.yaml")
TUNE = str(ROOT / "experiments" / "mini_llava_tune.yaml")

# (case id, YAML text written to exp.yaml or None, command line ({exp}, {tmp}, {models} filled in), fragment)
CASES = [
    ("duplicate-key", "name: x\nname: y\n", "validate {exp}", "duplicate key 'name'"),
    ("bool-for-int", "name: x\nschedule: {inject_layer: true}\n", "validate {exp}", "inject_layer: expected a number"),
    (
        "bool-for-shape",
        "name: x\nmodel: {shape: {num_layers: true}}\n",
        "validate {exp}",
        "model.shape.num_layers: expected a number",
    ),
    (
        "lora-typo",
        "name: x\nmodel: {kind: tiny_llava}\ntrain: {stage: finetune, lora: {rr: 8}}\n",
        "validate {exp}",
        "train.lora.rr",
    ),
    (
        "deepspeed-typo",
        "name: x\ntrain: {deepspeed: {zero_optimisation: {stage: 2}}}\n",
        "validate {exp}",
        "did you mean 'zero_optimization'",
    ),
    ("lr-inf", "name: x\ntrain: {lr: .inf}\n", "validate {exp}", "train.lr: Input should be a finite number"),
    ("lr-nan", "name: x\ntrain: {lr: .nan}\n", "validate {exp}", "train.lr: Input should be a finite number"),
    (
        "relative-unknown",
        "name: x\neval: {benchmarks: [{name: easy_vqa}], relative: [probes]}\n",
        "validate {exp}",
        "relative=['probes']: name benchmarks of eval.benchmarks (easy_vqa)",
    ),
    (
        "promotion-unknown",
        "name: x\ntune: {fidelity: {promotion: best}}\n",
        "validate {exp}",
        "tune.fidelity.promotion: Input should be 'halving' or 'interval'",
    ),
    ("seed-unknown", "name: x\ntune: {seeds: [vanilla, nope]}\n", "validate {exp}", "tune.seeds.1: unknown schedule"),
    (
        "space-inf-bound",
        "name: x\ntune: {space: {schedule.first_keep_ratio: {float: [0.1, .inf]}}}\n",
        "validate {exp}",
        "tune.space.schedule.first_keep_ratio.float.1: Input should be a finite number",
    ),
    ("override-no-key", None, f"validate {SMOKE} =5", "override '=5' names no field"),
    # a path that is no file from the working directory falls back to a shipped experiment, else one line
    ("experiment-missing", None, "validate {tmp}/mini_llava_eval.yaml", "mini_llava_eval.yaml: no such experiment"),
    ("experiment-near-miss", None, "eval experiments/mini_llava_evl.yaml", "the shipped experiment 'mini_llava_eval'"),
    ("ui-port", None, "ui --port 99999", "--port must be between 1 and 65535"),
    ("demo-trials", None, "demo --trials -1", "--trials must be >= 1, not -1"),
    ("demo-samples", None, "demo --samples 0", "--samples must be >= 1, not 0"),
    ("analyze-output", None, f"analyze {ANALYZE} analyze.output={{tmp}}/afile/sub", "analyze.output: cannot write"),
    ("train-restart-force", None, f"train {SMOKE} --restart --force", "--restart and --force contradict"),
    # Ray addresses that can never work: refused before any run folder or MLflow run exists
    (
        "train-dashboard-address",
        None,
        f"train {SMOKE} train.ray_address=http://127.0.0.1:8265",
        "train.ray_address=http://127.0.0.1:8265 is a dashboard (job submission) address",
    ),
    (
        "tune-dashboard-address",
        None,
        f"tune {TUNE} tune.ray_address=http://127.0.0.1:8265",
        "is a dashboard (job submission) address",
    ),
    ("train-unreachable-ray", None, f"train {SMOKE} train.ray_address=127.0.0.1:1", "cannot reach the Ray cluster at"),
    # model folders that do not load (built by the `models` fixture)
    ("model-corrupt", None, "eval {models}/corrupt.yaml", "corrupt: cannot load the llava-hf model"),
    ("model-wrong-shape", None, "eval {models}/shape.yaml", "the weights do not fit its config.json"),
    ("model-pickle", None, "eval {models}/pickle.yaml", "pickled weights file that holds more than tensors"),
    ("model-bad-config-value", None, "eval {models}/badvalue.yaml", "Field 'hidden_size' expected int"),
    ("model-bad-schedule", None, "eval {models}/badschedule.yaml", "hidrop.schedule.num_layers"),
    ("model-bad-section", None, "eval {models}/badsection.yaml", "the 'hidrop' section must be an object"),
    ("model-not-json", None, "eval {models}/notjson.yaml", "config.json' is not a valid JSON file"),
    # --- issue 34: checkpoint options that could unpickle (1) and resume (9) ---
    # --- issue 34: run names (2) and concurrent sweeps (5) ---
    # --- issue 34: credentials (3) and paths read from files (4) ---
    # --- issue 34: YAML bombs and shapes (6) ---
    # --- issue 34: write paths and tracking URIs checked first (7) ---
    # --- issue 34: numbers and values refused (8) ---
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llava-hf folder, broken six ways, each with an experiment YAML that evaluates it."""
    from hidrop.schedule import preset
    from hidrop.tiny import tiny_vlm

    root = tmp_path_factory.mktemp("models")
    tiny_vlm(seed=1).save(root / "ok", schedule=preset("pdrop", 8, 16))
    tiny_vlm(seed=1, num_layers=4).model.save_pretrained(root / "four_layers")

    def variant(name: str) -> Path:
        shutil.copytree(root / "ok", root / name)
        return root / name

    def edit_config(folder: Path, change) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    (variant("corrupt") / "model.safetensors").write_bytes(b"garbage" * 10)
    shutil.copy(root / "four_layers" / "model.safetensors", variant("shape") / "model.safetensors")
    pickled = variant("pickle")
    (pickled / "model.safetensors").unlink()
    torch.save({"weights": Planted(root / "ran")}, pickled / "pytorch_model.bin")
    edit_config(variant("badvalue"), lambda c: c["text_config"].update(hidden_size="wide"))
    edit_config(variant("badschedule"), lambda c: c["hidrop"].update(schedule={"num_layers": "x"}))
    edit_config(variant("badsection"), lambda c: c.update(hidrop="oops"))
    (variant("notjson") / "config.json").write_text("{not json")
    for name in ("corrupt", "shape", "pickle", "badvalue", "badschedule", "badsection", "notjson"):
        (root / f"{name}.yaml").write_text(
            f"name: {name}\nmodel: {{kind: llava_hf, path: {root / name}}}\n"
            "eval: {benchmarks: [{name: easy_vqa, limit: 2}]}\n"
        )
    yield root
    assert not (root / "ran").exists(), "a planted pickle ran"


@pytest.mark.parametrize("case, text, command, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, text, command, fragment, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    exp = tmp_path / "exp.yaml"
    if text is not None:
        exp.write_text(text)
    models = request.getfixturevalue("models") if "{models}" in command else ""
    argv = command.format(exp=exp, tmp=tmp_path, models=models).split()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, argv)
    # transformers' weight-loading bar is progress, not an error message
    lines = [line for line in result.output.splitlines() if line.strip() and "it/s]" not in line]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
