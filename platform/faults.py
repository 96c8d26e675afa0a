"""Faults for tests, entering the training loop through one seam: hooks that `run_training` adds when
an environment variable asks. Production code has no test-only branches."""

from __future__ import annotations

import os

from hidrop.training import Hook, StepEnd, TrainingLoop

FAIL_AT_STEP_ENV = "HIDROP_TEST_FAIL_AT_STEP"


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
