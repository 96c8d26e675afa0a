"""Experiment YAMLs, overrides, bad input and the command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hidrop_platform.cli import app
from hidrop_platform.config.loader import ConfigError, flatten, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_yaml_validates(path):
    cfg = load_config(path)
    assert cfg.schedules() and all(s.num_layers == cfg.model.shape.num_layers for s in cfg.schedules())


def test_flops_json_prints_method_table():
    files = [
        str(ROOT / "experiments" / f"llava15_7b_{n}.yaml")
        for n in ("vanilla", "pdrop", "fastv", "hidrop", "hidrop_tok48", "hidrop_tok80")
    ]
    result = runner.invoke(app, ["flops", *files, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["schedules"]
    assert [f"{r['vision_tflops']:.3f}" for r in rows] == ["3.817", "1.777", "2.007", "0.421", "0.317", "0.529"]
    assert [round(r["avg_vision_tokens"], 2) for r in rows] == [576, 270, 306, 64.0, 48.0, 80.03]
    for r in rows:
        assert len(r["tokens_per_layer"]) == 32 and r["model_tflops"] > r["vision_tflops"]


def test_flops_table_human_output():
    result = runner.invoke(app, ["flops", str(ROOT / "experiments/llava15_7b_hidrop.yaml")])
    assert result.exit_code == 0 and "0.421" in result.output and "64.00" in result.output


def test_validate_prints_plan():
    result = runner.invoke(app, ["validate", str(ROOT / "experiments/llava15_7b_hidrop.yaml")])
    assert result.exit_code == 0, result.output
    assert "0x8, 576x2, 215x4, 10x2, 5x2, 1x6, 0x8" in result.output and "0.421" in result.output


def test_overrides_use_dotted_names(tmp_path):
    cfg = load_config(
        ROOT / "experiments/llava15_7b_hidrop.yaml", ["schedule.exit_layer=27", "schedule.position_mode=compacted"]
    )
    assert cfg.main_schedule.exit_layer == 27 and cfg.main_schedule.position_mode.value == "compacted"
    flat = flatten(cfg)
    assert flat["schedule.exit_layer"] == 27 and flat["model.shape.hidden_size"] == 4096


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nschedule: {preset: hidrop_tok64, exit_layer: 5}\n", "exit_layer=5 must come after inject_layer=9"),
        (
            "name: x\nschedule: {inject_layer: 3, drops: [{after_layer: 4, keep: 900}]}\n",
            "keep=900 is larger than the number of vision tokens (576)",
        ),
        ("name: x\nschedule: {preset: nope}\n", "unknown schedule preset 'nope'"),
        ("name: x\nmodel: {shape: {num_layers: many}}\n", "model.shape.num_layers"),
        ("name: x\nbogus: 1\n", "bogus"),
        ("name: [unclosed\n", "malformed YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("name: x\nmodel: {shape: {num_attention_heads: 0}}\n", "model.shape.num_attention_heads"),
        ("name: x\nmodel: {shape: {num_vision_tokens: 0}}\n", "model.shape.num_vision_tokens"),
        ("name: x\nbench: {methods: [vanilla, nope]}\n", "unknown preset(s) ['nope']"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, text, message):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert message in result.output.replace("\n", " ") or message.split("(")[0].strip() in result.output


def test_missing_file_and_bad_override(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "no such experiment file" in result.output
    with pytest.raises(ConfigError, match="must look like a.b=value"):
        load_config(ROOT / "experiments/llava15_7b_hidrop.yaml", ["schedule.exit_layer"])
    for bad, says in (("compare.5.preset=x", "compare"), ("schedule.drops.a=1", "override"), ("name.x=1", "override")):
        with pytest.raises(ConfigError, match=says) as info:
            load_config(
                ROOT / "experiments/llava15_7b_pdrop.yaml",
                [bad] if bad != "schedule.drops.a=1" else ["schedule.drops=[]", bad],
            )
        assert "\n" not in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_console_script_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nschedule: {preset: hidrop_tok64, exit_layer: 5}\n")
    exe = Path(sys.executable).with_name("hidrop")
    proc = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "schedule" in lines[0] and "exit_layer=5" in lines[0]


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    code = "import platform; print(platform.system()); import hidrop_platform.config.schema"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("Linux", "Darwin", "Windows")
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_hidrop_package_does_not_import_platform_stack():
    code = (
        "import sys, hidrop.engine, hidrop.schedule, hidrop.cost, hidrop.tiny; "
        "bad = [m for m in ('ray', 'mlflow', 'deepspeed') if m in sys.modules]; print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_json_stdout_is_the_document_alone():
    """With --json, what libraries and child processes print while the work runs goes to stderr."""
    import subprocess
    import sys

    code = """
import os, subprocess, types
import hidrop_platform.evaluate.runs as evaluate

def noisy(cfg, progress=None, vlm=None, **kw):
    print("python-level noise")
    os.write(1, b"fd-level noise\\n")
    subprocess.run(["echo", "child noise"], check=True)
    return types.SimpleNamespace(to_dict=lambda **kw: {"ok": 1})

evaluate.run_eval = noisy
from hidrop_platform.cli import app
app(["eval", "experiments/mini_llava_eval.yaml", "--json"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": 1}
    for noise in ("python-level noise", "fd-level noise", "child noise"):
        assert noise in done.stderr


def test_preset_checkpoint_is_the_schedule_the_model_carries(tmp_path):
    """`preset: checkpoint` stands for the schedule saved with model.path (learned keep counts and all),
    read from its config.json without loading the model; fields beside it adjust it as for any preset."""
    from hidrop.schedule import DropEvent, Schedule
    from hidrop.tiny import tiny_vlm

    learned = Schedule(
        num_layers=8,
        num_vision_tokens=16,
        inject_layer=2,
        exit_layer=7,
        drops=(DropEvent(after_layer=3, keep=5),),
        name="learned",
    )
    tiny_vlm(seed=1).save(tmp_path / "trained", schedule=learned)
    data = {
        "name": "from_checkpoint",
        "model": {"kind": "tiny_llava", "path": str(tmp_path / "trained")},
        "schedule": {"preset": "checkpoint"},
        "compare": [{"preset": "checkpoint", "exit_layer": 6, "name": "learned_exit6"}],
        "tune": {"seeds": ["checkpoint", "vanilla"]},
    }
    cfg = validate_config(data)
    assert cfg.main_schedule == learned
    exit6 = cfg.schedules()[1]
    assert exit6.exit_layer == 6 and exit6.drops == learned.drops and exit6.name == "learned_exit6"
    tiny_vlm(seed=1).save(tmp_path / "plain")  # no schedule saved with it
    with pytest.raises(
        ConfigError, match="preset 'checkpoint' needs a model.path whose config.json carries a schedule"
    ):
        validate_config({**data, "model": {"kind": "tiny_llava", "path": str(tmp_path / "plain")}})
    with pytest.raises(ConfigError, match="tune.seeds.0: preset 'checkpoint'"):
        validate_config({**data, "schedule": {"preset": "vanilla"}, "compare": [], "model": {"kind": "tiny_llava"}})


def _alias_bomb(levels: int) -> str:
    """An experiment whose benchmark options expand to 10^levels strings through aliases (a few hundred bytes)."""
    lines = ["name: x", "eval:", "  benchmarks:", "  - name: easy_vqa", "    options:"]
    lines += ["      a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_by_count_before_anything_expands(tmp_path):
    # 10^7 values once expanded; loading alone shares the aliased lists, so a regression fails here in
    # seconds (DID NOT RAISE) instead of growing to gigabytes the way `validate` would
    from hidrop_platform.config.loader import load_config_data

    exp = tmp_path / "bomb.yaml"
    exp.write_text(_alias_bomb(7))
    assert len(exp.read_bytes()) < 600
    with pytest.raises(ConfigError, match=r"YAML refused \(line \d+, column \d+\): more than 100000 values"):
        load_config_data(exp)
    exp.write_text(_alias_bomb(4))  # 10^4 values: a large but legal document still loads
    assert len(load_config_data(exp)["eval"]["benchmarks"][0]["options"]["a3"]) == 10


def test_override_values_are_bounded_like_files(tmp_path):
    from hidrop_platform.config.loader import load_config_data

    exp = tmp_path / "x.yaml"
    exp.write_text("name: x\n")
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(ConfigError, match="override 'description': YAML refused: nested deeper than 64 levels"):
        load_config_data(exp, [f"description={deep}"])


def test_a_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    """Ray workers run in their trial folders: `sqlite:///mlflow.db` must name the driver's file, not one per
    worker (a sweep with it once crashed: the driver could not find the runs its trials had logged)."""
    monkeypatch.chdir(tmp_path)
    base = {"name": "rel", "model": {"kind": "tiny_llava"}}
    for given, expected in [
        ("sqlite:///mlflow.db", f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"),
        ("sqlite:///sub/m.db?timeout=5", f"sqlite:///{tmp_path.resolve().as_posix()}/sub/m.db?timeout=5"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ]:
        cfg = validate_config({**base, "tracking": {"uri": given}})
        assert cfg.tracking.uri == expected


def test_tune_and_train_check_the_cluster_once_per_command(tmp_path, monkeypatch):
    """The CLI connects before its progress bar and hands the result on: the run does not check again."""
    from types import SimpleNamespace

    import yaml

    from hidrop_platform.train import driver as train_driver
    from hidrop_platform.tune import driver as tune_driver

    calls = []
    monkeypatch.setattr(tune_driver, "connect_for_tune", lambda cfg, resume=False: calls.append("tune") or (1, 0.0))
    # run_tune returns a SweepResult: --json prints its to_dict()
    monkeypatch.setattr(tune_driver, "_run_held", lambda *a: SimpleNamespace(to_dict=lambda: {"ran": "tune"}))
    monkeypatch.setattr(
        train_driver, "connect_for_training", lambda cfg, restart=False, force=False: calls.append("train")
    )
    monkeypatch.setattr(train_driver, "_run_held", lambda *a: {"ran": "train"})
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "once",
                "model": {"kind": "tiny_llava"},
                "schedule": {"inject_layer": 2, "exit_layer": 7, "stages": 2, "first_keep_ratio": 0.5},
                "tracking": {"enabled": False},
                "tune": {"num_samples": 1, "space": {"schedule.first_keep_ratio": {"float": [0.2, 0.8]}}},
            }
        )
    )
    for command in ("tune", "train"):
        result = CliRunner().invoke(app, [command, str(exp), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"ran": command}
    assert calls == ["tune", "train"]  # one check each (twice each before)
