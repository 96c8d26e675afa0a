"""Faults found by trying to break the platform (issue 19): each test reproduces one and shows it holds.

Fast tests exercise the pieces directly (config comparison, the weights-only checkpoint loader); the slow
ones run the real `hidrop train` on a tiny model, with Ctrl+C sent as a real SIGINT."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from planted import Planted
from typer.testing import CliRunner

from hidrop_platform.train.resume import (
    CONFIG_FILE,
    ContinuationRefused,
    UnsafeCheckpoint,
    WeightsOnlyLoads,
    config_changes,
    load_deepspeed_checkpoint,
    prepare_run_folder,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "tiny_train_smoke.yaml"


def _plant(path: Path, marker: Path) -> None:
    torch.save({"module": Planted(marker)}, path)


# ---- 1. a changed config does not silently continue the old run ----------------------------------
def test_config_changes_lists_what_may_not_change():
    old = {"name": "t", "train": {"lr": 0.003, "max_steps": 200, "log_every": 1}, "schedule": {"preset": "a"}}
    new = {"name": "t", "train": {"lr": 0.01, "max_steps": 260, "log_every": 5}, "schedule": {"preset": "b"}}
    assert config_changes(old, new) == {"schedule.preset": ("a", "b"), "train.lr": (0.003, 0.01)}
    assert config_changes(old, {**old, "train": {**old["train"], "max_steps": 9}}) == {}


def test_prepare_run_folder_refuses_forces_and_restarts(tmp_path):
    folder = tmp_path / "runs" / "t"
    old = {"name": "t", "train": {"lr": 0.003}}
    assert prepare_run_folder(folder, old) is None  # fresh
    assert json.loads((folder / CONFIG_FILE).read_text()) == old
    (folder / "checkpoint_2026-12-01_00-00-00").mkdir()
    assert prepare_run_folder(folder, old) == "continuing the earlier run"
    new = {"name": "t", "train": {"lr": 0.01}}
    with pytest.raises(ContinuationRefused, match=r"train.lr: 0.003 -> 0.01.*--restart.*--force"):
        prepare_run_folder(folder, new)
    assert json.loads((folder / CONFIG_FILE).read_text()) == old  # nothing changed by a refusal
    assert "train.lr" in prepare_run_folder(folder, new, force=True)
    moved = prepare_run_folder(folder, old, restart=True)
    aside = [p for p in folder.parent.iterdir() if p.name.startswith("t.replaced-")]
    assert len(aside) == 1 and str(aside[0]) in moved
    assert (aside[0] / "checkpoint_2026-12-01_00-00-00").is_dir()  # the old run is kept, not deleted
    assert not any(folder.glob("checkpoint_*"))


# ---- 2. resume never runs code from the checkpoint folder ----------------------------------------
def test_weights_only_loads_refuse_a_planted_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    _plant(path, marker)
    with pytest.raises(UnsafeCheckpoint, match="refusing to resume from .*mp_rank_00_model_states.pt"):
        WeightsOnlyLoads(None).load(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: the same file does run code when unpickled
    assert marker.exists()


def test_weights_only_loads_read_tensors_and_deepspeed_state(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "state.pt"
    state = {"module": {"w": torch.arange(4.0)}, "zero_stage": ZeroStageEnum.gradients, "ds_version": "0.19"}
    torch.save(state, path)
    loaded = WeightsOnlyLoads(None).load(str(path))
    assert torch.equal(loaded["module"]["w"], state["module"]["w"]) and loaded["zero_stage"] == 2


def test_resume_keeps_deepspeed_own_unpickling_loads_weights_only(tmp_path):
    """DeepSpeed's optimizers read universal-checkpoint files with torch.load(weights_only=False) themselves,
    outside the checkpoint engine: within a resume that load is weights-only too."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    marker = tmp_path / "ran"
    (tmp_path / "deepspeed" / "zero").mkdir(parents=True)
    _plant(tmp_path / "deepspeed" / "zero" / "optimizer_state.pt", marker)

    class Engine:  # what load_checkpoint does with checkpoint.load_universal: the optimizer reads zero/
        checkpoint_engine = None

        def load_checkpoint(self, folder, tag, load_module_strict):
            ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir(object(), "bit16_groups", f"{folder}/{tag}")

    with pytest.raises(UnsafeCheckpoint, match="refusing to resume from .*deepspeed: it holds more than tensors"):
        load_deepspeed_checkpoint(Engine(), str(tmp_path), tag="deepspeed", strict=True)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the rest of the process is as it was
    torch.load(tmp_path / "deepspeed" / "zero" / "optimizer_state.pt", weights_only=False)  # the control
    assert marker.exists()


# ---- real runs ------------------------------------------------------------------------------------
def _train(tmp_path, *overrides, flags=()):
    from hidrop_platform.cli import app

    args = [
        "train",
        str(SMOKE),
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.num_workers=1",
        "--json",
        *flags,
        *overrides,
    ]
    return CliRunner().invoke(app, args)


def _train_runs(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_run_folder_through_ctrl_c_continuation_a_planted_pickle_and_restart(tmp_path, monkeypatch):
    """One run folder through its life, one scenario so the slow suite trains three times instead of five:
    Ctrl+C marks the run killed and names its last checkpoint; a changed config is refused and touches
    nothing; the same command continues the same run, every step logged once; a pickle planted in the
    newest checkpoint is refused before anything runs; --restart starts afresh."""
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [
        str(Path(sys.executable).parent / "hidrop"),
        "train",
        str(SMOKE),
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.num_workers=1",
        "train.checkpoint_every=2",
        "train.max_steps=5000",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "tiny_train_smoke"
    deadline = time.time() + 900  # a hang guard: the first checkpoint on a loaded machine
    while time.time() < deadline and not list(folder.glob("checkpoint_*/hidrop_complete.json")):
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stdout[-2000:] + stderr
    assert "interrupted" in stderr and "re-run the same command to continue" in stderr, stderr
    assert "Traceback" not in stderr
    client, runs = _train_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["status"] == "interrupted" and "hidrop.interrupted_at_step" in runs[0].data.tags
    end = int(runs[0].data.tags["hidrop.interrupted_at_step"]) + 2
    named = re.search(r"the last checkpoint \(step (\d+)\)", stderr)
    assert named, stderr

    # a changed config is refused, naming what changed, and nothing in the run folder is touched
    before = _files(folder)
    refused = _train(
        tmp_path, "train.checkpoint_every=2", f"train.max_steps={end}", "train.lr=1e-2", "schedule.preset=vanilla"
    )
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "train.lr: 0.003 -> 0.01" in refused.output and "schedule.preset" in refused.output
    assert _files(folder) == before
    client, runs = _train_runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.params["train.lr"] == "0.003"

    # the same command (a shorter max_steps is allowed) continues the same run to the end
    again = subprocess.run(
        [*args[:-1], f"train.max_steps={end}", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    client, runs = _train_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, end + 1))  # every step once
    tags = runs[0].data.tags
    assert tags["hidrop.resumed_from_step"] == named.group(1)  # the step the message named
    assert "status" not in tags and "hidrop.interrupted_at_step" not in tags  # finished, not interrupted

    # a pickle planted in the newest checkpoint: resuming refuses it and never unpickles it
    planted = list(folder.glob("checkpoint_*/deepspeed/deepspeed/mp_rank_00_model_states.pt"))
    planted = planted or list(folder.glob("checkpoint_*/**/mp_rank_00_model_states.pt"))
    assert planted, sorted(str(p) for p in folder.rglob("*.pt"))
    marker = tmp_path / "ran"
    for path in planted:
        _plant(path, marker)
    refused = _train(tmp_path, "train.checkpoint_every=2", f"train.max_steps={end + 2}")
    assert refused.exit_code == 2, refused.output
    assert "refusing to resume" in refused.output and "Traceback" not in refused.output
    assert not marker.exists()
    assert len(_train_runs(tmp_path)[1]) == 1  # the refusal started no run

    fresh = _train(tmp_path, "train.max_steps=2", "train.lr=1e-2", flags=["--restart"])
    assert fresh.exit_code == 0, fresh.output
    client, runs = _train_runs(tmp_path)
    assert len(runs) == 2 and {r.data.params["train.lr"] for r in runs} == {"0.003", "0.01"}
    assert any(p.name.startswith("tiny_train_smoke.replaced-") for p in (tmp_path / "runs").iterdir())
    assert not marker.exists()


# ---- 4. two processes creating one new store ----------------------------------------------------------
_PREPARE = """
import sys, time
from pathlib import Path
from hidrop_platform.tracking.store import prepare
folder = Path(sys.argv[1])
(folder / f"ready-{sys.argv[2]}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
print(prepare(f"sqlite:///{folder}/new/mlflow.db", "exp"))
"""


def test_two_processes_create_a_new_store_at_once(tmp_path):
    for attempt in range(2):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PREPARE, str(folder), str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        deadline = time.time() + 120
        while time.time() < deadline and len(list(folder.glob("ready-*"))) < 2:
            time.sleep(0.01)
        (folder / "go").touch()  # both at once, on a store that does not exist yet
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
        assert outs[0][0].strip() == outs[1][0].strip()  # the same experiment, created once


# ---- 6. credentials in tracking.uri stay in the environment -----------------------------------------
def test_credentials_move_from_the_uri_into_the_environment(monkeypatch):
    import yaml

    from hidrop_platform.config.loader import flatten, load_config

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "placeholder")  # restored after the test
        monkeypatch.delenv(key)
    cfg = load_config(SMOKE, ["tracking.uri=http://user:s3cret@127.0.0.1:9"])
    assert cfg.tracking.uri == "http://127.0.0.1:9"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "user" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    written = json.dumps(flatten(cfg)) + yaml.safe_dump(cfg.model_dump(mode="json"))
    assert "s3cret" not in written and "user@" not in written


# ---- 5. a reference that scores 0: undefined relative scores are reported, not a crash ---------------
def test_sweep_with_a_zero_reference_reports_undefined_scores(tmp_path, capsys):
    from hidrop_platform.cli import search_views as cli
    from hidrop_platform.tracking.tracker import Tracker
    from hidrop_platform.tune.results import _undefined_note
    from hidrop_platform.tune.results import log_summary as _log_summary
    from hidrop_platform.tune.summary import SweepReference, SweepResult, TrialRecord, summarize_sweep

    reference = {"scores": {"easy_vqa": 0.0}, "blind_scores": {"easy_vqa": 0.0}, "blind_relative_score": None}
    metrics = {"relative_score": None, "vision_tflops": 0.5, "avg_vision_tokens": 64.0, "score/easy_vqa": 0.0}
    trials = [
        TrialRecord.from_metrics(label, "finished", metrics, seed=label.startswith("seed"), overrides={})
        for label in ("seed:vanilla", "trial-001")
    ]
    summary = summarize_sweep(trials, reference["scores"], reference["blind_scores"])
    assert summary.pareto == [] and summary.undefined == ["seed:vanilla", "trial-001"]
    assert summary.blind_relative_score is None
    record = SweepResult(
        sweep="zero",
        trials=summary.trials,
        pareto=summary.pareto,
        significant=[],
        blind_level=[],
        discoveries=[],
        reference_scores=reference["scores"],
        blind_relative_score=None,
        blind_relative_interval=None,
        rejections={},
        rejected=0,
        failed=0,
        questions_run=0,
        concurrency=1,
        wall_time_s=1.0,
        accelerator_hours=0.0,
        undefined=summary.undefined,
        notes=_undefined_note(summary.undefined, reference["scores"]),
        valid_share=1.0,
        parent_run_id=None,
        tracking_uri="sqlite:///x",
        sweep_dir=str(tmp_path),
    )
    typed = SweepReference.model_validate(reference)
    _log_summary(Tracker("sqlite:///unused", "x", enabled=False), record, tmp_path, "zero", typed)
    assert "undefined" in (tmp_path / "summary" / "pareto.md").read_text()
    cli.print_sweep(record)
    printed = capsys.readouterr().out
    assert "2 finished trials have no relative score" in printed and "blind baseline: undefined" in printed


# ---- 8. Ctrl+C pressed repeatedly on a sweep stops it cleanly ----------------------------------------
# ---- 7. a full disk: a new store is created whole or not at all; spooled records are replayable --------
_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a new store needs about 1 MB
from hidrop_platform.tracking.store import TrackingUnavailable, prepare
try:
    prepare(sys.argv[1], "exp")
except TrackingUnavailable as e:
    print(e)
"""


def test_a_store_cut_short_by_a_full_disk_can_be_created_later(tmp_path):
    from hidrop_platform.tracking.store import prepare

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, uri], capture_output=True, text=True, timeout=600)
    assert "cannot create the MLflow store" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "\n" not in proc.stdout.strip() and "[SQL:" not in proc.stdout
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no half-migrated database left behind
    assert prepare(uri, "exp")  # the next command, with room again, creates it


def test_spooled_records_replay_with_hidrop_sync(tmp_path, monkeypatch):
    import mlflow

    from hidrop_platform.cli import app
    from hidrop_platform.tracking.store import default_spool_dir
    from hidrop_platform.tracking.tracker import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker("http://127.0.0.1:9", "exp", run_name="offline", spool_dir=default_spool_dir()).start()
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.log_metrics({"loss": 1.25}, step=2)
    tracker.finish()
    assert list(default_spool_dir().glob("*.jsonl"))
    later = f"sqlite:///{tmp_path / 'later.db'}"
    result = CliRunner().invoke(app, ["sync", "--tracking-uri", later, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("{") :])["spools"]
    assert [r["status"] for r in rows] == ["synced"]
    history = mlflow.MlflowClient(later).get_metric_history(rows[0]["run_id"], "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 1.25)]
    assert not list(default_spool_dir().glob("*.jsonl"))  # replayed: the spool is gone
    again = CliRunner().invoke(app, ["sync"])
    assert again.exit_code == 0 and "nothing to sync" in again.output


# ---- issue 20: a training still waiting for workers stops on Ctrl+C ------------------------------
@pytest.mark.slow
def test_ctrl_c_stops_a_training_still_waiting_for_its_workers(tmp_path):
    """A request the cluster cannot place now (the per-node check skipped, as on an autoscaling cluster)
    waits for workers; Ctrl+C must end it promptly with the usual message, not hang."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HIDROP_SKIP_RESOURCE_CHECK": "1"}
    args = [
        str(Path(sys.executable).parent / "hidrop"),
        "train",
        str(SMOKE),
        "train.resources_per_worker={CPU: 64}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the store is created once Ray is up; then the controller waits for a placement that never comes
    deadline = time.time() + 180
    while time.time() < deadline and not (tmp_path / "mlflow.db").exists():
        time.sleep(1)
    # soon after: the controller may not have reported itself yet (the driver waits for it to kill it)
    time.sleep(3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)  # a hang fails here
    assert proc.returncode == 130, stdout[-2000:] + stderr
    assert "interrupted" in stderr and "no checkpoint was written yet" in stderr and "Traceback" not in stderr


def test_ctrl_c_waits_for_a_controller_not_heard_yet():
    """Ctrl+C before the controller reported itself: its handle is waited for (a fit thread left inside
    Ray at shutdown makes Ray end the process with status 1), but not after the fit has ended."""
    import threading

    from hidrop_platform.train.driver import _wait_for_controller

    heard: dict = {}
    fitting = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
    fitting.start()
    late = threading.Timer(0.5, lambda: heard.update(controller="handle"))
    late.start()
    assert _wait_for_controller(heard, fitting, timeout=30) == "handle"
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    assert _wait_for_controller({}, ended, timeout=30) is None  # returns at once: nothing to wait for


def test_a_worker_group_restarted_before_any_checkpoint_finds_its_run(tmp_path):
    from hidrop_platform.train.worker import WorkerPayload, _remember_run, _run_of_this_fit

    def payload(fit_id: str) -> WorkerPayload:
        return WorkerPayload({}, "sqlite://", "exp", str(tmp_path / "run" / "export"), str(tmp_path), fit_id=fit_id)

    assert _run_of_this_fit(payload("a")) is None
    _remember_run(payload("a"), "run-1")
    assert _run_of_this_fit(payload("a")) == "run-1"  # Ray restarted the group: same fit, same run
    assert _run_of_this_fit(payload("b")) is None  # a new command starts its own run (or resumes a checkpoint)


# ---- issue 34 (9): a re-run resumes from the newest complete checkpoint, and Ctrl+C names that step ------
def _checkpoint(folder: Path, name: str, step: int, complete: bool) -> Path:
    from hidrop_platform.train.resume import STATE_FILE, mark_complete

    path = folder / name
    (path / "deepspeed").mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step, "run_id": "run-1"}))
    if complete:
        mark_complete(path, step)
    return path


def test_resume_and_the_ctrl_c_message_agree_on_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Ray registered step 20; steps 40 (complete) and 50 (one rank's upload cut short: no completion mark)
    are on storage. The re-run resumes from 40 and Ctrl+C's message names 40."""
    import ray.train

    from hidrop_platform.config.loader import load_config
    from hidrop_platform.train.driver import _interrupted
    from hidrop_platform.train.worker import _resume

    folder = tmp_path / "tiny_train_smoke"
    registered = _checkpoint(folder, "checkpoint_2026-01-01_00-00-20", 20, complete=True)
    newest = _checkpoint(folder, "checkpoint_2026-01-01_00-00-40", 40, complete=True)
    _checkpoint(folder, "checkpoint_2026-01-01_00-00-50", 50, complete=False)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(registered)))

    class Engine:
        checkpoint_engine, loaded = None, []

        def load_checkpoint(self, folder, tag, load_module_strict):
            self.loaded.append(Path(folder))

    engine = Engine()
    state, run_id = _resume(engine, False, folder)
    assert (state.step, run_id, engine.loaded) == (40, "run-1", [newest])
    message = _interrupted(load_config(SMOKE), folder, "sqlite:///unused", {"step": 47})
    assert f"the last checkpoint (step 40) is {newest}; re-run the same command" in message


def test_a_checkpoint_is_marked_complete_only_when_ray_persisted_a_new_one(tmp_path, monkeypatch):
    import ray.train

    from hidrop_platform.train.hooks import SaveCheckpoint as _Checkpoint
    from hidrop_platform.train.resume import newest_complete_checkpoint

    folder = tmp_path / "run"
    old = _checkpoint(folder, "checkpoint_2026-01-01_00-00-10", 10, complete=True)
    new = _checkpoint(folder, "checkpoint_2026-01-01_00-00-20", 20, complete=False)
    hook = _Checkpoint(None, None, rank=0, frozen=False, every=10, folder=folder)
    before = ray.train.Checkpoint.from_directory(str(old))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: before)
    hook._mark_complete(before, 20)  # Ray skipped the report: nothing new was persisted
    assert newest_complete_checkpoint(folder) == (old, 10)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(new)))
    hook._mark_complete(before, 20)
    assert newest_complete_checkpoint(folder) == (new, 20)
