"""Faults for tests, entering through one seam: loop hooks that `run_training` adds, and a check at a
search trial's start, each only when its environment variable asks."""

from __future__ import annotations

import os

from hidrop.training import Hook, StepEnd, TrainingLoop

FAIL_AT_STEP_ENV = "HIDROP_TEST_FAIL_AT_STEP"
FAIL_TRIAL_ENV = "HIDROP_TEST_FAIL_TRIAL"


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


def fault_hooks() -> list[Hook]:
    step = int(os.environ.get(FAIL_AT_STEP_ENV) or 0)
    return [FailAtStep(step)] if step else []


def fail_trial_if_asked(label: str, attempt: int) -> None:
    """Fail the first attempt of the search trial named by the environment (Tune retries it)."""
    if os.environ.get(FAIL_TRIAL_ENV) == label and attempt == 1:
        raise RuntimeError(f"injected failure in {label} ({FAIL_TRIAL_ENV})")
