"""What the project may write under a storage path: plain names, folders it owns, one driver at a time."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from hidrop_platform.storage import OWNER_MARK, StorageError, check_name, claim, hold
from hidrop_platform.train.resume import CONFIG_FILE, prepare_run_folder


@pytest.mark.parametrize(
    "name", ["../../x", "/abs/path", "", ".", "..", ".hidden", "-rf", "a/b", "a\\b", "a\x00b", "a\tb", "a b", "x" * 129]
)
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(ValueError) as err:
        check_name(name)
    assert "\n" not in str(err.value)
    assert "\x00" not in str(err.value) and "\t" not in str(err.value)  # shown escaped


@pytest.mark.parametrize("name", ["mini_llava_tune", "demo-20261207-012345-train-hidrop", "run.v2", "lr=1e-4", "A+B"])
def test_plain_names_pass_unchanged(name):
    assert check_name(name) == name


def _foreign(tmp_path):
    """A folder hidrop never made, shaped to look like a run: a `checkpoint_notes/` folder and a file."""
    folder = tmp_path / "storage" / "notes"
    (folder / "checkpoint_notes").mkdir(parents=True)
    (folder / "checkpoint_notes" / "todo.txt").write_text("mine")
    (folder / "thesis.tex").write_text("mine too")
    return folder


def _tree(folder):
    return sorted(str(p.relative_to(folder.parent)) for p in folder.parent.rglob("*"))


@pytest.mark.parametrize("restart", [False, True])
def test_a_foreign_folder_is_neither_continued_nor_moved(tmp_path, restart):
    folder = _foreign(tmp_path)
    before = _tree(folder)
    with pytest.raises(StorageError, match="was not created by hidrop"):
        prepare_run_folder(folder, {"name": "notes"}, restart=restart)
    assert _tree(folder) == before


def test_our_folders_carry_the_mark_and_legacy_runs_are_still_ours(tmp_path):
    folder = tmp_path / "runs" / "fresh"
    assert prepare_run_folder(folder, {"name": "fresh"}) is None
    assert (folder / OWNER_MARK).is_file() and json.loads((folder / CONFIG_FILE).read_text()) == {"name": "fresh"}
    # a run written before the mark existed has our config file: it continues, and gets the mark
    legacy = tmp_path / "runs" / "legacy"
    (legacy / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (legacy / CONFIG_FILE).write_text(json.dumps({"name": "legacy"}))
    assert prepare_run_folder(legacy, {"name": "legacy"}) == "continuing the earlier run"
    assert (legacy / OWNER_MARK).is_file()
    # an empty folder (made by hand, or by a tool that creates it first) is fine to take
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    claim(empty, "sweep")
    with pytest.raises(StorageError, match="is a file"):
        claim(tmp_path / "runs" / "fresh" / CONFIG_FILE, "run")


def test_orphan_clean_up_removes_only_checkpoints_ray_names(tmp_path):
    from hidrop_platform.train.driver import _remove_orphans

    folder = tmp_path / "run"
    kept = folder / "checkpoint_2026-01-02_00-00-00.000000"
    orphan = folder / "checkpoint_2026-01-01_00-00-00.000000"
    notes = folder / "checkpoint_notes"
    for path in (kept, orphan, notes):
        path.mkdir(parents=True)
    result = SimpleNamespace(checkpoint=SimpleNamespace(path=str(kept)), best_checkpoints=[])
    assert _remove_orphans(folder, result) == [orphan.name]
    assert kept.is_dir() and notes.is_dir() and not orphan.exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hidrop_platform.storage import hold
    with hold(Path(sys.argv[1]), "sweep 'x'"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_second_driver_is_refused_until_the_first_dies_even_by_sigkill(tmp_path):
    folder = tmp_path / "runs" / "x"
    with hold(folder, "sweep 'x'"):  # in this process: a second hold on the same folder is refused
        with pytest.raises(StorageError, match=r"sweep 'x' is already running in .* \(process \d+\)"):
            with hold(folder, "sweep 'x'"):
                pass
    with hold(folder, "sweep 'x'"):  # released on exit
        pass
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match=f"process {other.pid}"):
            with hold(folder, "sweep 'x'"):
                pass
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait(timeout=60)
    with hold(folder, "sweep 'x'"):  # the kernel dropped the dead driver's lock: a resume may start
        pass
    assert not folder.exists()  # the lock sits beside the folder, which it never creates


@pytest.mark.slow
def test_the_same_sweep_started_twice_at_once_runs_once(tmp_path, monkeypatch):
    import yaml
    from test_tune import _cli_at_once, _runs, _tiny, start_sweep

    from hidrop_platform.train.faults import TRIAL_BARRIER_ENV

    exp = tmp_path / "tune.yaml"
    exp.write_text(yaml.safe_dump(_tiny(tmp_path, seeds=["vanilla"], num_samples=1, max_concurrent=1)))
    barrier = tmp_path / "barrier"  # the first trial waits there until this test adds a second file
    monkeypatch.setenv(TRIAL_BARRIER_ENV, f"{barrier}:2")
    first = start_sweep(exp, tmp_path, "--json", until=lambda _: barrier.is_dir() and any(barrier.iterdir()))
    try:
        # while it runs: a second start is told the sweep exists, and a --resume (which would evaluate the
        # same trials again beside it) is told it is running
        second, third = _cli_at_once(
            ("tune", str(exp), "--json"), ("tune", str(exp), "--resume", "--json"), cwd=tmp_path
        )
    finally:
        (barrier / "release").touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    for proc, said in ((second, "already exists"), (third, "is already running")):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert said in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    runs, client = _runs(tmp_path / "mlflow.db")
    assert len([r for r in runs if r.data.tags.get("hidrop.kind") == "sweep"]) == 1  # one parent
    names = [r.info.run_name for r in runs if r.data.tags.get("hidrop.kind") != "sweep"]
    assert sorted(names) == sorted(set(names)) and len(names) == 2  # every trial evaluated once
    for r in runs:
        if r.data.tags.get("hidrop.kind") != "sweep":
            assert len(client.get_metric_history(r.info.run_id, "relative_score")) == 1


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "runs" / "x"
    folder.parent.mkdir()
    (folder.parent / ".x.hidrop.lock").symlink_to(victim)
    with pytest.raises(StorageError, match="cannot use the lock file"):
        with hold(folder, "training 'x'"):
            pass
    assert victim.read_text() == "keep me"


def test_storage_that_cannot_lock_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with hold(tmp_path / "runs" / "x", "training 'x'"):
        ran.append(True)
    assert ran == [True]
    assert "warning: cannot lock" in capsys.readouterr().out


def test_a_run_from_before_config_files_is_still_ours(tmp_path):
    old = tmp_path / "runs" / "old"
    (old / "checkpoint_2025-01-01_00-00-00.000000").mkdir(parents=True)
    (old / "checkpoint_2025-01-01_00-00-00.000000" / "hidrop_state.json").write_text('{"step": 4}')
    assert prepare_run_folder(old, {"name": "old"}) == "continuing the earlier run"
