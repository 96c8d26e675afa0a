"""`make gpu-check` in its dry mode (`--device cpu --tiny`): the exact command the GPU machine runs, from
the tree through platform/bench/gpu_check.sh, with ray, mlflow and deepspeed made unimportable (the GPU
machine has none of them). Every section of the JSON must be there; the batch search is checked
against brute force."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# as if not installed: importing fails, and find_spec (how transformers probes for deepspeed) finds nothing
BLOCK = """
import importlib.util, sys
ABSENT = {"ray", "mlflow", "deepspeed"}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] in ABSENT else _find_spec(name, package)
importlib.util.find_spec = find_spec
"""


@pytest.mark.slow
def test_the_gpu_check_runs_dry_without_ray_mlflow_or_deepspeed(tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK)
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    done = subprocess.run(
        ["bash", str(ROOT / "platform" / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tiny"] is True
    tests = result["gpu_tests"]
    assert tests["exit_code"] == 0 and tests["counts"].get("skipped", 0) >= 3 and "failed" not in tests["counts"]
    assert tests["sdpa_flash_parity"] == {"ran": False, "reason": "SDPA's flash kernel needs CUDA"}
    for section in ("prefill", "generate", "train"):
        names = [r["name"] for r in result[section]["methods"]]
        assert names[0] == "vanilla" and any(n.startswith("hidrop_tok64") for n in names), section
        assert all(r["speedup_vs_vanilla"] > 0 for r in result[section]["methods"])
    d = result["decoupling"]
    assert (
        d["parallel_ms"] > 0
        and d["sequential_ms"] > 0
        and d["gain_ms"] == pytest.approx(d["sequential_ms"] - d["parallel_ms"])
    )
    budget = result["memory_budget"]
    assert all(r["largest_batch"] >= 1 and r["tokens_per_s"] > 0 for r in budget["methods"])
    assert set(result["goals"]) >= {"prefill_goal_met", "train_goal_met", "decoupling_goal_met"}
    assert "GPU check on cpu" in done.stdout and "parallel decoupling" in done.stdout


def test_largest_fitting_batch_against_brute_force():
    from hidrop_platform.bench.gpu_check import largest_fitting

    for limit in (0, 1, 2, 3, 7, 8, 9, 100, 4096, 5000):
        calls = []

        def fits(b, limit=limit):
            calls.append(b)
            return b <= limit

        expected = max([b for b in range(1, 4097) if b <= limit], default=0)
        assert largest_fitting(fits, most=4096) == expected, limit
        assert len(calls) <= 30  # doubling then bisection, not a scan


def test_every_gpu_test_file_is_run_by_the_check():
    from hidrop_platform.bench.gpu_check import GPU_TEST_FILES

    marked = sorted(
        f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if re.search(r"mark\.gpu\b", p.read_text())
    )
    assert marked == sorted(GPU_TEST_FILES)
