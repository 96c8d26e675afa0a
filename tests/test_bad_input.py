"""Bad input, table-driven: every case must end in exit status 2 with ONE line naming the problem, no
traceback, and nothing written. The next case costs one row."""

import importlib.util
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
    (
        "deepspeed-load-universal",
        "name: x\ntrain: {deepspeed: {checkpoint: {load_universal: true}}}\n",
        "validate {exp}",
        "train.deepspeed: checkpoint.load_universal is not supported",
    ),
    (
        "train-load-universal-override",
        None,
        f"train {SMOKE} train.deepspeed.checkpoint.load_universal=true",
        "checkpoint.load_universal is not supported",
    ),
    # --- issue 34: run names (2) and concurrent sweeps (5) ---
    ("storage-uri", None, f"train {SMOKE} train.storage_path=s3://bucket/runs", "storage URIs are not supported"),
    ("name-escapes", None, f"validate {SMOKE} name=../../x", "name: '../../x' is not a plain folder name"),
    ("name-absolute", None, f"train {SMOKE} name=/abs/path", "name: '/abs/path' is not a plain folder name"),
    ("name-empty", None, f"train {SMOKE} name=''", "name: must be a folder name, not empty"),
    ("name-unset", None, f"train {SMOKE} name=", "name: Input should be a valid string"),
    ("name-control", 'name: "a\\x01b"\n', "validate {exp}", "name: 'a\\x01b' is not a plain folder name"),
    ("tune-name-escapes", None, f"tune {TUNE} tune.name=../../../x", "tune.name: '../../../x' is not a plain"),
    # --- issue 34: credentials (3) and paths read from files (4) ---
    # an upper-case scheme is still http: the password leaves the URI before any message names it
    (
        "report-uri-upper-scheme",
        None,
        "report demo --tracking-uri HTTP://user:pw-Zq81x@127.0.0.1:1",
        "MLflow tracking server http://127.0.0.1:1 unreachable",
    ),
    # --- issue 34: YAML bombs and shapes (6) ---
    # alias bombs under free-form mappings: ~2 x 10^5 values once expanded (the bound is 10^5), so a
    # regression costs seconds and ~100 MB, not gigabytes
    (
        "yaml-alias-bomb-options",
        "name: x\neval:\n  benchmarks:\n  - name: easy_vqa\n    options:\n"
        "      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 5))
        + "      b: [*a4, *a4]\n",
        "validate {exp}",
        "values once its aliases (*name) are expanded",
    ),
    (
        "yaml-alias-bomb-deepspeed",
        "name: x\ntrain:\n  deepspeed:\n    aio:\n"
        "      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 5))
        + "      b: [*a4, *a4]\n",
        "validate {exp}",
        "YAML refused (line 9, column 11): more than 100000 values",
    ),
    (
        "yaml-deep-nesting",
        "name: x\ndescription: " + "[" * 20000 + "]" * 20000 + "\n",
        "validate {exp}",
        "nested deeper",
    ),
    ("yaml-list-key", "name: x\n[a, b]: 1\n", "validate {exp}", "a mapping key must be a plain value, not a list"),
    (
        "yaml-self-alias",
        "name: x\neval: {benchmarks: [{name: easy_vqa, options: &a {x: *a}}]}\n",
        "validate {exp}",
        "an alias refers to a node that contains it",
    ),
    (  # 40 levels around 40 levels around ...: each alone is shallow
        "yaml-alias-nesting",
        "name: x\neval: {benchmarks: [{name: easy_vqa, options: {a0: &a0 1, "
        + ", ".join(f"a{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40 for i in range(1, 30))
        + "}}]}\n",
        "validate {exp}",
        "nested deeper than 64 levels once its aliases (*name) are expanded",
    ),
    (
        "yaml-too-large",
        "name: x\ndescription: " + "a" * (1 << 20) + "\n",
        "validate {exp}",
        "an experiment file is at most",
    ),
    # --- issue 34: write paths and tracking URIs checked first (7) ---
    ("uri-unparsable", None, "report demo --tracking-uri http://[::1", "is not a valid URI"),
    # every place a command writes is checked before the model loads or a run starts
    (
        "records-under-file",
        None,
        f"eval {ROOT}/experiments/mini_llava_eval.yaml --records {{tmp}}/afile/r.jsonl",
        "afile is a file, not a folder",
    ),
    (
        "records-proc",
        None,
        f"eval {ROOT}/experiments/mini_llava_eval.yaml --records /proc/r.jsonl",
        "--records /proc/r.jsonl: cannot write to /proc",
    ),
    ("report-out-file", None, "report demo --out {tmp}/afile", "afile is a file, not a folder"),
    ("demo-out-file", None, "demo --out {tmp}/afile/sub", "/afile/sub: "),
    ("storage-file", None, f"train {SMOKE} train.storage_path={{tmp}}/afile", "afile: "),
    ("tune-storage-file", None, f"tune {TUNE} tune.storage_path={{tmp}}/afile", "is a file, not a folder"),
    ("uri-htp", None, f"train {SMOKE} tracking.uri=htp://127.0.0.1:1", "unknown scheme 'htp' (did you mean 'http'?)"),
    ("uri-sqlit", None, f"train {SMOKE} tracking.uri=sqlit:///{{tmp}}/x.db", "(did you mean 'sqlite'?)"),
    *(  # the driver is no dependency of ours; where it is installed this case cannot arise
        [("uri-no-driver", None, f"train {SMOKE} tracking.uri=postgresql://u@db/x", "driver psycopg2 is not installed")]
        if importlib.util.find_spec("psycopg2") is None
        else []
    ),
    ("uri-not-sqlite", None, f"train {SMOKE} tracking.uri=sqlite:///{{tmp}}/afile", "afile is not a SQLite database"),
    ("report-uri-htp", None, "report demo --tracking-uri htp://127.0.0.1:1", "unknown scheme 'htp'"),
    # --- issue 34: numbers and values refused (8) ---
    # records files: exp.yaml holds the JSON lines (label a@exp)
    (
        "records-score-inf",
        '{"method": "a", "benchmark": "easy_vqa", "id": 1, "unit": "1", "score": Infinity}\n',
        "compare {exp}:a --reference a@exp",
        "score inf is not in [0, 1]",
    ),
    (
        "records-score-nan",
        '{"method": "a", "benchmark": "easy_vqa", "id": 1, "unit": "1", "score": NaN}\n',
        "compare {exp}:a --reference a@exp",
        "score nan is not in [0, 1]",
    ),
    (
        "records-score-above-1",
        '{"method": "a", "benchmark": "easy_vqa", "id": 1, "unit": "1", "score": 1.5}\n',
        "compare {exp}:a --reference a@exp",
        "score 1.5 is not in [0, 1]",
    ),
    (
        "compare-resamples",
        '{"method": "a", "benchmark": "easy_vqa", "id": 1, "unit": "1", "score": 1}\n',
        "compare {exp}:a --reference a@exp --resamples 2000000000",
        "give 1 to 100000",
    ),
    ("eval-no-benchmarks", "name: x\neval: {benchmarks: []}\n", "validate {exp}", "eval.benchmarks: List should have"),
    ("bench-no-methods", "name: x\nbench: {methods: []}\n", "validate {exp}", "bench.methods: List should have"),
    ("bench-search-candidates", None, f"bench search {TUNE} --candidates -3", "--candidates must be >= 1, not -3"),
    ("bench-search-budget-nan", None, f"bench search {TUNE} --budget nan", "--budget must be a positive, finite"),
    ("demo-samples-huge", None, "demo --samples 1000000000", "--samples must be at most 4000"),
    (
        "micro-batch-over-data",
        "name: x\nmodel: {kind: tiny_llava}\ntrain: {data: [{name: easy_vqa, limit: 2}], micro_batch_size: 4}\n",
        "validate {exp}",
        "give at most 2 training samples: not one batch of micro_batch_size=4",
    ),
    ("preset-empty", "name: x\nschedule: {preset: ''}\n", "validate {exp}", "schedule.preset: an empty preset name"),
    ("seed-65-bits", "name: x\nseed: 36893488147419103232\n", "validate {exp}", "seed: Input should be less than"),
    ("seed-negative", "name: x\nseed: -1\n", "validate {exp}", "seed: Input should be greater than or equal to 0"),
    ("shape-huge-layers", "name: x\nmodel: {shape: {num_layers: 100000000}}\n", "flops {exp}", "num_layers: Input"),
    (
        "space-int-huge",
        "name: x\ntune: {space: {schedule.inject_layer: {int: [0, 100000000000000000000]}}}\n",
        "validate {exp}",
        "bounds must lie within +-1000000000",
    ),
    ("sync-spool-file", None, "sync --spool-dir {tmp}/afile", "/afile is not a folder"),
    # an empty file (exp.yaml) as the store: reading must not create MLflow's tables in it
    ("report-empty-db", "", "report demo --tracking-uri sqlite:///{exp}", "exp.yaml is not an MLflow store"),
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


def _one_line_exit_2(result, fragment: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_a_truncated_gzip_records_file_is_one_line(tmp_path):
    # issue 34 (7): an EOFError from gzip reached click, which prints only "Aborted."
    import gzip

    rows = "".join(
        json.dumps({"method": "m", "benchmark": "easy_vqa", "id": i, "unit": f"u{i}", "score": 1.0}) + "\n"
        for i in range(200)
    )
    whole = gzip.compress(rows.encode())
    (tmp_path / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "b.jsonl.gz").write_bytes(whole)
    specs = [f"{tmp_path}/a.jsonl.gz:m=A", f"{tmp_path}/b.jsonl.gz:m=B"]
    result = CliRunner().invoke(app, ["compare", *specs, "--reference", "B"])
    _one_line_exit_2(result, "a.jsonl.gz: truncated (the gzip stream ends early)")


def test_a_corrupt_saved_run_config_is_one_line(tmp_path):
    # issue 34 (7): a damaged hidrop_config.json next to a checkpoint raised a JSONDecodeError traceback
    from hidrop_platform.train.resume import CONFIG_FILE, ContinuationRefused, prepare_run_folder

    folder = tmp_path / "run"
    prepare_run_folder(folder, {"train": {"lr": 0.1}})
    (folder / "checkpoint_000000").mkdir()
    for damaged in (b"{not json", b"\xff\xfe", b"[1, 2]"):
        (folder / CONFIG_FILE).write_bytes(damaged)
        with pytest.raises(ContinuationRefused, match=r"hidrop_config.json: the run's saved config is unreadable"):
            prepare_run_folder(folder, {"train": {"lr": 0.1}})
    assert prepare_run_folder(folder, {"train": {"lr": 0.1}}, force=True) == "continuing the earlier run"
    assert json.loads((folder / CONFIG_FILE).read_text()) == {"train": {"lr": 0.1}}  # rewritten


def test_train_refuses_a_damaged_run_before_ray_or_mlflow_start(tmp_path, monkeypatch):
    # the continuation is checked first: no MLflow store, no run folder change, no Ray
    import hidrop_platform.train.driver as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "start_ray", lambda *a: pytest.fail("Ray started before the run folder was checked"))
    run = tmp_path / "runs" / "tiny_train_smoke"
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (run / "hidrop_config.json").write_text("{not json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["train", SMOKE, f"train.storage_path={tmp_path / 'runs'}"])
    _one_line_exit_2(result, "the run's saved config is unreadable")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_records_into_a_folder_is_refused_before_the_evaluation(tmp_path, monkeypatch):
    # issue 34 (7): --records naming a folder failed with a traceback after the whole evaluation
    import hidrop_platform.evaluate.runs as evaluate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.jsonl").mkdir()
    monkeypatch.setattr(evaluate, "build_model", lambda cfg: pytest.fail("the model loaded before the check"))
    experiment = str(ROOT / "experiments" / "mini_llava_eval.yaml")
    result = CliRunner().invoke(app, ["eval", experiment, "--records", str(tmp_path / "r.jsonl")])
    _one_line_exit_2(result, "r.jsonl is a folder, not a file")
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
