"""Turn-taking between two processes on one machine (the overhead benchmark's Ray worker and plain loop),
and the loop hooks that take the turns and record the step times."""

from __future__ import annotations

import json
import os
import select
from pathlib import Path
from typing import Optional

from hidrop.errors import UserError
from hidrop.training import Hook, StepEnd, TrainingLoop


class OverheadBenchError(UserError, RuntimeError):
    """The overhead benchmark cannot run this config, or one of its two sides failed (one line for the CLI)."""


class Turns:
    """Two processes on one machine take turns, one optimizer step each, through two named pipes.

    The overhead benchmark runs the Ray worker and the plain loop side by side and alternates them step by
    step, so both see the same machine: on a shared VM the speed drifts by 30% over tens of seconds, more
    than the overhead being measured, and timing the two paths one after the other measures the drift.
    Each side blocks on its own pipe until the other writes a byte into it, so waiting costs no CPU.
    """

    TURN, STOP = b"t", b"s"

    def __init__(self, folder: str | Path, me: str, other: str, timeout_s: float = 600.0):
        self.me, self.other, self.timeout_s = me, other, timeout_s
        # O_RDWR: opening never blocks for want of a peer, and the pipe outlives either side's writes
        self._mine = os.open(Path(folder) / f"{me}.fifo", os.O_RDWR)
        self._theirs = os.open(Path(folder) / f"{other}.fifo", os.O_RDWR)

    @staticmethod
    def create(folder: str | Path, names: tuple[str, str]) -> dict[str, int]:
        """Make the two pipes and hold them open for the caller, who closes the returned descriptors: a
        pipe's bytes live only while someone holds it open, and a side may stop before the other opened it."""
        held = {}
        for name in names:
            path = Path(folder) / f"{name}.fifo"
            path.unlink(missing_ok=True)
            os.mkfifo(path)
            held[name] = os.open(path, os.O_RDWR)
        return held

    def wait(self) -> None:
        ready, _, _ = select.select([self._mine], [], [], self.timeout_s)
        if not ready:
            raise OverheadBenchError(
                f"the {self.other} side of the overhead benchmark did not answer in {self.timeout_s:.0f} s"
            )
        if os.read(self._mine, 1) == self.STOP:
            raise OverheadBenchError(f"the {self.other} side of the overhead benchmark stopped")

    def hand_over(self) -> None:
        os.write(self._theirs, self.TURN)

    def stop(self) -> None:
        """Wake the other side with the news that this one has stopped (a byte never overwrites another)."""
        os.write(self._theirs, self.STOP)

    def close(self) -> None:
        os.close(self._mine)
        os.close(self._theirs)


class TakeTurns(Hook):
    """The loop side of `Turns`: wait for the turn before the first step and after each one. The pipes
    open in the process that runs the loop (`open`, idempotent), never in the pickled hook."""

    def __init__(self, folder: str | Path, me: str, other: str, *, hand_first: bool, wait_after_last: bool):
        self.folder, self.me, self.other = str(folder), me, other
        self.hand_first, self.wait_after_last = hand_first, wait_after_last
        self.turns: Optional[Turns] = None

    def open(self) -> Turns:
        if self.turns is None:
            self.turns = Turns(self.folder, self.me, self.other)
        return self.turns

    def on_start(self, loop: TrainingLoop) -> None:
        turns = self.open()
        if self.hand_first:  # set up: the other side may take its first step
            turns.hand_over()
        turns.wait()

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        self.turns.hand_over()
        # the Ray side waits after its last step too: the plain loop's last step must not share the
        # machine with the worker's shutdown
        if step.step < step.total or self.wait_after_last:
            with loop.paused():  # the wait is not the step's time
                self.turns.wait()

    def on_end(self, loop: TrainingLoop) -> None:
        self.close()

    def stop(self) -> None:
        """This side failed: wake the other with the news."""
        self.open().stop()

    def close(self) -> None:
        if self.turns is not None:
            self.turns.close()
            self.turns = None


class RecordStepTimes(Hook):
    """Each optimizer step's wall time and loss, written to `path` as JSON when the loop ends."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.seconds: list[float] = []
        self.loss: list[float] = []

    def on_step_end(self, loop: TrainingLoop, step: StepEnd) -> None:
        self.seconds.append(step.seconds)
        self.loss.append(step.loss)

    def on_end(self, loop: TrainingLoop) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps({"seconds": self.seconds, "loss": self.loss}))
