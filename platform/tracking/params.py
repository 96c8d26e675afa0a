"""What a run records besides its own values: the machine's load (`system_metrics`), the installed
stack (`package_versions`) and the resolved schedule (`schedule_params`), the same for every kind of run.

Nothing here imports torch or mlflow: only a process that already uses CUDA reports GPU memory, and no
other starts CUDA or loads the stack just to name its versions.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

import psutil

from hidrop.evaluation.published import schedule_method
from hidrop_platform.tracking import names as N


def system_metrics() -> dict[str, float]:
    """CPU percent, process RSS, system memory used (GB = 1e9 bytes) and, when CUDA is in use, GPU memory.

    Keys are prefixed `system/`. The first CPU reading of a process is not meaningful (psutil reports 0).
    """
    gb = 1e9
    out: dict[str, float] = {}
    out["system/cpu_percent"] = psutil.cpu_percent(interval=None)
    out["system/process_rss_gb"] = psutil.Process().memory_info().rss / gb
    vm = psutil.virtual_memory()
    out["system/memory_used_gb"] = (vm.total - vm.available) / gb
    # only a process that already uses torch has GPU memory of its own; never import it (or init CUDA) here
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"system/gpu{i}_memory_allocated_gb"] = torch.cuda.memory_allocated(i) / gb
            out[f"system/gpu{i}_memory_reserved_gb"] = torch.cuda.memory_reserved(i) / gb
    return out


_VERSIONED = ("torch", "transformers", "ray", "deepspeed", "mlflow", "peft", "hidrop")


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (absent packages are left out), read from metadata, never imported."""
    out = {"python": ".".join(str(x) for x in sys.version_info[:3])}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def schedule_params(schedule) -> dict[str, Any]:
    """The resolved schedule as MLflow params, the same for sweep trials and trainings: what the report
    needs to find the paper's row of the same method and budget, and to tell runs apart that differ
    only in position encoding (Table 10)."""
    # no key here is a field of the YAML's schedule section (flatten(cfg) logs those first)
    return {
        N.PLAN: schedule.describe(),
        N.KEEP_COUNTS: schedule.keep_counts,
        N.RESOLVED_NAME: schedule.name,
        N.METHOD: schedule_method(schedule),
        N.RESOLVED_AVG_TOKENS: round(schedule.avg_tokens(), 4),
        N.RESOLVED_POSITION_MODE: schedule.position_mode.value,
        N.RESOLVED_QUERY_RULE: schedule.query_rule.value,
        N.RESOLVED_SELECTOR: schedule.selector.value,
    }
