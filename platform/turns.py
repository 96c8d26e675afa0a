"""Turn-taking between two processes on one machine (the overhead benchmark's Ray worker and plain loop)."""

from __future__ import annotations

import os
import select
from pathlib import Path


class OverheadBenchError(RuntimeError):
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
