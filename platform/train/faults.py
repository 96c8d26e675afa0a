"""Faults for tests, entering through one seam: loop hooks that `run_training` adds, and a check at a
search trial's start, each only when its environment variable asks."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hidrop.training import Hook, StepEnd, TrainingLoop

FAIL_AT_STEP_ENV = "HIDROP_TEST_FAIL_AT_STEP"
FAIL_TRIAL_ENV = "HIDROP_TEST_FAIL_TRIAL"
TRIAL_BARRIER_ENV = "HIDROP_TEST_TRIAL_BARRIER"  # "FOLDER:N"
HOLD_AT_STEP_ENV = "HIDROP_TEST_HOLD_AT_STEP"  # "STEP:FILE"
BARRIER_GIVE_UP_S = 900  # only a hang guard: a barrier that can never fill fails the trial instead


class FailAtStep(Hook):
    """Raise after step `step` of a run's first attempt (its checkpoint written): Ray restarts the worker
    group, which must resume from that checkpoint into the same MLflow run."""

    def __init__(self, step: int):
        self.step, self.armed = step, True

    def on_start(self, loop: TrainingLoop) -> None:
        self.armed = loop.state.step == 0  # a resumed attempt runs to the end

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        if self.armed and step.step == self.step:
            raise RuntimeError(f"injected failure at step {step.step} ({FAIL_AT_STEP_ENV})")


class HoldAtStep(Hook):
    """Wait after step `step` (its checkpoint written) until `release` exists: a test acts on a run
    known to be mid-way (kills a worker) instead of racing the steps."""

    def __init__(self, step: int, release: str):
        self.step, self.release = step, Path(release)

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        if step.step != self.step:
            return
        with loop.paused():
            _wait_for(self.release.exists, f"{HOLD_AT_STEP_ENV}: {self.release} never appeared")


def fault_hooks() -> list[Hook]:
    hooks: list[Hook] = []
    step = int(os.environ.get(FAIL_AT_STEP_ENV) or 0)
    if step:
        hooks.append(FailAtStep(step))
    hold = os.environ.get(HOLD_AT_STEP_ENV)
    if hold:
        at, _, release = hold.partition(":")
        hooks.append(HoldAtStep(int(at), release))
    return hooks


def fail_trial_if_asked(label: str, attempt: int) -> None:
    """Fail the first attempt of the search trial named by the environment (Tune retries it)."""
    if os.environ.get(FAIL_TRIAL_ENV) == label and attempt == 1:
        raise RuntimeError(f"injected failure in {label} ({FAIL_TRIAL_ENV})")


def wait_at_trial_barrier(label: str) -> None:
    """Hold each search trial until N trials have started (files in FOLDER, one per label): with one
    trial slot per node, N = the node count makes every node run one, whatever each node's start-up
    time (a tiny trial would otherwise finish before a slow node's actor is up, and the head ran all)."""
    spec = os.environ.get(TRIAL_BARRIER_ENV)
    if not spec:
        return
    folder, _, count = spec.rpartition(":")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / label.replace("/", "_")).touch()
    _wait_for(
        lambda: len(list(folder.iterdir())) >= int(count), f"{TRIAL_BARRIER_ENV}: {int(count)} trials never ran at once"
    )


def _wait_for(condition, failure: str) -> None:
    """Poll `condition` until it holds; past BARRIER_GIVE_UP_S (a hang guard) raise with `failure`."""
    deadline = time.monotonic() + BARRIER_GIVE_UP_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.2)
