import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

try:
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """`hidrop demo` at its smallest, once per session, in a fresh folder: the browser test looks at it,
    the MLflow schema test reads what it wrote (one demo run instead of two separate tiny ones)."""
    import json
    import subprocess

    work = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["demo", "--size", "small", "--trials", "1", "--samples", "8", "--train-steps", "2", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "hidrop_platform.cli", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"work": work, "result": json.loads(done.stdout), "env": env}
