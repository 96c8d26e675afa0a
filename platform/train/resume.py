"""What a re-run of `hidrop train` continues, and what resuming may read from shared storage.

A training run lives in `<train.storage_path>/<name>/`: Ray's checkpoints and the config the run started
with (`hidrop_config.json`, written by the driver). Re-running the same name continues it only when the
new config agrees with that one, apart from the fields listed in CONTINUABLE, which change when a run
goes on but not what it trains. Anything else is refused in one line before Ray starts. It continues
from the newest checkpoint marked complete (COMPLETE_FILE), which can be newer than Ray's latest.

Checkpoints hold DeepSpeed's states as torch pickles. The storage folder is often shared, so a resume
loads them with `torch.load(weights_only=True)` and an explicit allowlist of the classes DeepSpeed puts
there: a planted pickle fails to load instead of running. Every other torch.load during the resume is
forced weights-only too, and DeepSpeed's universal checkpoints are refused by the config.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from hidrop.errors import UserError
from hidrop_platform.config.loader import flatten_data
from hidrop_platform.storage import claim, refuse_foreign

CONFIG_FILE = "hidrop_config.json"
STATE_FILE = "hidrop_state.json"  # in a checkpoint folder: the loop's counters and the MLflow run id
DS_TAG = "deepspeed"  # DeepSpeed's tag (its subfolder) in a checkpoint folder
# what only our runs hold, for folders from before the owner mark (the oldest have no config file)
OURS = (CONFIG_FILE, f"checkpoint_*/{STATE_FILE}")

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


class ContinuationRefused(UserError, RuntimeError):
    """A re-run whose config differs from the run it would continue (one line for the CLI)."""


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted name -> (old, new) for every field that differs and may not change on a continuation."""
    a, b = flatten_data(old), flatten_data(new)
    changes = {}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not key.startswith(CONTINUABLE):
            changes[key] = (a.get(key), b.get(key))
    return changes


def ray_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders Ray Train wrote in `folder` (`checkpoint_<date>_<time>`; Tune's
    `checkpoint_000003`): a `checkpoint_notes/` of someone else's is none of them."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint_\d[\d_.:-]*", p.name))


COMPLETE_FILE = "hidrop_complete.json"  # in a checkpoint folder: every rank's part of it is on storage


def mark_complete(checkpoint: Path, step: int) -> None:
    """Record that `checkpoint` (a step's folder on storage) holds every rank's files; rank 0 writes it
    after all ranks uploaded. Written aside and renamed: a reader never sees half of it."""
    temporary = checkpoint / f"{COMPLETE_FILE}.tmp"
    temporary.write_text(json.dumps({"step": step}))
    temporary.replace(checkpoint / COMPLETE_FILE)


def newest_complete_checkpoint(folder: Path) -> Optional[tuple[Path, int]]:
    """The complete checkpoint in the run folder with the highest step, and that step: what a re-run or a
    restarted worker group continues from. Ray registers checkpoints asynchronously, so after Ctrl+C or a
    killed worker its latest can be older than what is on storage."""
    found = []
    for path in ray_checkpoints(folder):
        try:
            found.append((path, int(json.loads((path / COMPLETE_FILE).read_text())["step"])))
        except (OSError, ValueError, KeyError, TypeError):  # not (yet) complete
            continue
    return max(found, key=lambda item: (item[1], item[0].name), default=None)


def has_checkpoint(folder: Path) -> bool:
    """Whether Ray would continue the run in `folder` (it restores its latest checkpoint there)."""
    return bool(ray_checkpoints(folder))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _stored_config(stored: Path, force: bool) -> Optional[dict]:
    """The config a run started with, None when absent; a damaged file is refused in one line (with
    `force` the run continues as if none were stored), since nothing can be compared with it."""
    if not stored.is_file():
        return None
    try:
        old = json.loads(stored.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError(f"holds a {type(old).__name__}, not an object")
        return old
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if force:
            return None
        reason = " ".join(str(getattr(e, "strerror", None) or e).split())[:160]
        raise ContinuationRefused(
            f"{stored}: the run's saved config is unreadable ({reason}); pass --restart to start afresh "
            "(the old run is kept aside), use a new name, or --force to continue it regardless"
        ) from None


def check_run_folder(
    folder: Path, config: dict, restart: bool = False, force: bool = False
) -> tuple[Optional[str], dict[str, tuple[Any, Any]]]:
    """What a run with `config` would do to the run in `folder`, writing nothing: None (a fresh run),
    "restart" or "continue", with the changed fields (`config_changes`) a forced continuation accepts.
    Raises StorageError for a folder that is not ours, and ContinuationRefused for an unreadable or
    changed config unless `force`."""
    refuse_foreign(folder, "run", legacy=OURS)  # nothing of a folder we did not make is touched
    if restart and folder.exists():
        return "restart", {}
    if not has_checkpoint(folder):
        return None, {}
    old = _stored_config(folder / CONFIG_FILE, force)
    changes = config_changes(old, config) if old is not None else {}
    if changes and not force:
        listed = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(changes.items())[:4])
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        raise ContinuationRefused(
            f"{folder} holds a run of {folder.name!r} with a different config ({listed}{more}); "
            "pass --restart to start afresh (the old run is kept aside), use a new name, "
            "or --force to continue it with the new config"
        )
    return "continue", changes


def prepare_run_folder(folder: Path, config: dict, restart: bool = False, force: bool = False) -> Optional[str]:
    """`check_run_folder`, then record `config` in `folder`. Returns what happened to an earlier run
    (None for a fresh one); `restart` moves the earlier run aside (nothing is deleted) so this one
    starts afresh."""
    stored = folder / CONFIG_FILE
    outcome = None
    what, changes = check_run_folder(folder, config, restart, force)
    if what == "restart":
        aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(folder), str(aside))
        outcome = f"the earlier run was moved to {aside}"
    elif what == "continue":
        outcome = "continuing the earlier run" + (f" with changed {', '.join(changes)} (--force)" if changes else "")
    claim(folder, "run", legacy=OURS)
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
            raise _unsafe(path, e) from None


def _unsafe(path: str, e: Exception) -> UnsafeCheckpoint:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UnsafeCheckpoint(
        f"refusing to resume from {path}: it holds more than tensors and DeepSpeed's state "
        f"({reason[:200]}); a checkpoint folder must be writable only by you"
    )


_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _every_load_weights_only():
    """Inside, every torch.load of this process is weights-only with DeepSpeed's classes allowed, even one
    that passes weights_only=False (DeepSpeed's optimizers and universal/ZeRO-3 readers do, bypassing
    its checkpoint engine): torch reads these variables on each call."""
    import torch

    saved = {key: os.environ.pop(key, None) for key in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def load_deepspeed_checkpoint(engine, folder: str, tag: str, strict: bool) -> None:
    """`engine.load_checkpoint` through WeightsOnlyLoads (DeepSpeed's own engine unpickles everything),
    with every other torch.load on the way weights-only too."""
    import pickle

    original = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoads(original)
    try:
        with _every_load_weights_only():
            engine.load_checkpoint(folder, tag=tag, load_module_strict=strict)
    except pickle.UnpicklingError as e:  # a load outside the checkpoint engine: its path is not known here
        raise _unsafe(f"{folder}/{tag}", e) from None
    finally:
        engine.checkpoint_engine = original
