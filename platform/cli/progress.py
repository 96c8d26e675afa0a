"""The live displays the commands show while they work: a spinner with a status line, and the progress
bars of eval, train, tune and demo, each a context manager that yields the callback its platform
function takes. They draw on views.out, looked up at each call so that a test's console is used."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import hidrop_platform.cli.views as views


def status(text: str):
    """A spinner with `text`; the yielded status takes .update(new_text)."""
    return views.out.status(text)


def _bar(*, remaining: bool, stats: bool) -> Progress:
    """One bar: description, bar, done/total, elapsed, then (if asked) time left and a stats field."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    return Progress(*columns, console=views.out)


@contextlib.contextmanager
def eval_bar() -> Iterator[Callable[[int, int, str], None]]:
    with _bar(remaining=True, stats=False) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=f"evaluating {label}")

        yield progress


@contextlib.contextmanager
def train_bar(name: str) -> Iterator[Callable[[dict], None]]:
    with _bar(remaining=True, stats=True) as bar:
        task = bar.add_task(f"training {name}", total=None, stats="starting Ray workers...")

        def progress(info: dict) -> None:
            bar.update(
                task,
                completed=info["step"],
                total=info["total"],
                stats=f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  {info['samples_per_s']:.1f} samples/s",
            )

        yield progress


@contextlib.contextmanager
def sweep_bar() -> Iterator[Callable[[str, int, int], None]]:
    """Trials done of the sweep's total; before the trials start, the stage it is in."""
    with _bar(remaining=False, stats=False) as bar:
        task = bar.add_task("preparing", total=None)

        def progress(label: str, done: int, total: int) -> None:
            if total:
                bar.update(task, description=f"trials (last: {label})", completed=done, total=total)
            else:
                bar.update(task, description=label)

        yield progress


@contextlib.contextmanager
def demo_bar(demo_progress: type):
    """A stage line per demo step and one bar for the sweep's trials and the trainings' steps; yields an
    instance of `demo_progress` (the demo's DemoProgress, passed in: importing the demo takes seconds)."""
    with _bar(remaining=False, stats=True) as bar:
        task = bar.add_task("starting", total=None, stats="")

        class Shown(demo_progress):
            def stage(self, name: str, index: int, total: int, short: str = "") -> None:
                bar.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [{index}/{total}] {name}", highlight=False)
                bar.update(task, description=f"[{index}/{total}] {short or name}", completed=0, total=None, stats="")

            def sweep(self, label: str, done: int, total: int) -> None:
                if total:
                    bar.update(task, completed=done, total=total, stats=f"last: {label}")
                else:
                    bar.update(task, stats=label)

            def train(self, info: dict) -> None:
                bar.update(task, completed=info["step"], total=info["total"], stats=f"loss {info['loss']:.3f}")

        yield Shown()
