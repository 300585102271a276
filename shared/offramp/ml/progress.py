"""Progress of the long training steps, for a person at a terminal and for a log alike.

On a terminal: rich's bars. Elsewhere (a log file, ``docker logs``, CI), rich draws nothing
until the end, so a build that takes half an hour said nothing for half an hour; there, each
task prints a plain line when it starts, at most every ``every_s`` seconds while it runs, and
when it is done.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Bar(Protocol):
    """What rich's Progress offers and the steps use."""

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any: ...
    def update(self, task: Any, *args: Any, **kwargs: Any) -> None: ...


class NoProgress:
    """Nothing shown; the base of :class:`LineProgress`, which says something."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None,
                 completed: float = 0) -> int:
        return 0

    def update(self, task: Any, *, advance: float = 0, description: str | None = None) -> None:
        return None


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started: float
    said: float


@dataclass
class LineProgress(NoProgress):
    """One line per task now and then: ``backbone features: 1200/3000 (40%), 35 s``."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    every_s: float = 15.0
    clock: Any = time.monotonic
    tasks: list[_Task] = field(default_factory=list)

    def add_task(self, description: str, total: float | None = None,
                 completed: float = 0) -> int:
        now = self.clock()
        self.tasks.append(_Task(description, total, completed, now, now))
        self._say(self.tasks[-1], now)
        return len(self.tasks) - 1

    def update(self, task: Any, *, advance: float = 0, description: str | None = None) -> None:
        t, now = self.tasks[task], self.clock()
        t.completed += advance
        t.description = description or t.description
        done = t.total is not None and t.completed >= t.total
        if done or now - t.said >= self.every_s:
            self._say(t, now)

    def _say(self, t: _Task, now: float) -> None:
        t.said = now
        share = f" ({100 * t.completed / t.total:.0f}%)" if t.total else ""
        total = f"/{t.total:g}" if t.total is not None else ""
        print(f"{t.description}: {t.completed:g}{total}{share}, {now - t.started:.0f} s",
              file=self.out, flush=True)


def progress(enabled: bool = True) -> Any:
    """A context manager giving a :class:`Bar`: bars on a terminal, lines elsewhere, nothing
    when not ``enabled``."""
    if not enabled:
        return NoProgress()
    if sys.stdout.isatty():
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=False)
    return LineProgress()
