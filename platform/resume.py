"""What a re-run of `hidrop train` continues, and what resuming may read from shared storage.

A training run lives in `<train.storage_path>/<name>/`: Ray's checkpoints and the config the run started
with (`hidrop_config.json`, written by the driver). Re-running the same name continues it only when the
new config agrees with that one, apart from the fields listed in CONTINUABLE, which change when a run
goes on but not what it trains. Anything else is refused in one line before Ray starts.

Checkpoints hold DeepSpeed's states as torch pickles. The storage folder is often shared, so a resume
loads them with `torch.load(weights_only=True)` and an explicit allowlist of the classes DeepSpeed puts
there: a planted pickle fails to load instead of running.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from hidrop_platform.config import flatten_data

CONFIG_FILE = "hidrop_config.json"

# fields a continued run may change: how long it goes on and how it is watched, not what it trains
CONTINUABLE = (
    "train.max_steps",
    "train.epochs",
    "train.max_failures",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.export_every",
    "train.log_model",
    "train.eval_after",
    "train.ray_address",
    "eval.",
    "bench.",
    "tune.",
    "analyze.",
)


class ContinuationRefused(RuntimeError):
    """A re-run whose config differs from the run it would continue (one line for the CLI)."""


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted name -> (old, new) for every field that differs and may not change on a continuation."""
    a, b = flatten_data(old), flatten_data(new)
    changes = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(CONTINUABLE):
            changes[key] = (a.get(key), b.get(key))
    return changes


def has_checkpoint(folder: Path) -> bool:
    """Whether Ray would continue the run in `folder` (it restores its latest checkpoint there)."""
    return folder.is_dir() and any(p.is_dir() and p.name.startswith("checkpoint_") for p in folder.iterdir())


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare_run_folder(folder: Path, config: dict, restart: bool = False, force: bool = False) -> Optional[str]:
    """Check a re-run against the run in `folder` and record `config` there. Returns what happened to an
    earlier run (None for a fresh one). Raises ContinuationRefused for a changed config unless `force`;
    `restart` moves the earlier run aside (nothing is deleted) so this one starts afresh."""
    name = folder.name
    stored = folder / CONFIG_FILE
    outcome = None
    if restart and folder.exists():
        aside = folder.with_name(f"{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(folder), str(aside))
        outcome = f"the earlier run was moved to {aside}"
    elif has_checkpoint(folder):
        old = json.loads(stored.read_text()) if stored.is_file() else None
        changes = config_changes(old, config) if old is not None else {}
        if changes and not force:
            listed = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(changes.items())[:4])
            more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
            raise ContinuationRefused(
                f"{folder} holds a run of {name!r} with a different config ({listed}{more}); "
                "pass --restart to start afresh (the old run is kept aside), use a new name, "
                "or --force to continue it with the new config"
            )
        outcome = "continuing the earlier run" + (f" with changed {', '.join(changes)} (--force)" if changes else "")
    folder.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(config, indent=2))
    return outcome


# ---- loading DeepSpeed's states without running code from them ---------------------------------


def deepspeed_safe_globals() -> list:
    """The classes (beyond tensors and plain containers) a DeepSpeed checkpoint of ours holds."""
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, argparse.Namespace]


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file that holds something other than tensors and DeepSpeed's known state."""


class WeightsOnlyLoads:
    """Wraps a DeepSpeed checkpoint engine: saving is unchanged, every load is `weights_only=True` with
    `deepspeed_safe_globals()` allowed, so a planted pickle raises instead of running."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        import pickle

        import torch

        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpoint(
                f"refusing to resume from {path}: it holds more than tensors and DeepSpeed's state "
                f"({reason[:200]}); a checkpoint folder must be writable only by you"
            ) from None


def load_deepspeed_checkpoint(engine, folder: str, tag: str, strict: bool) -> None:
    """`engine.load_checkpoint` through WeightsOnlyLoads (DeepSpeed's own engine unpickles everything)."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoads(original)
    try:
        engine.load_checkpoint(folder, tag=tag, load_module_strict=strict)
    finally:
        engine.checkpoint_engine = original
