"""Ownership of admitted frames until their one result (pure: no I/O, clock passed in).

A task is answered exactly once: by its first completion, by ``expired`` when its deadline
passes, or by ``error`` when ``max_attempts`` dispatches made no progress. A task is
dispatched again at once when the node holding it goes offline or stops serving (its first
hop, or any later one its holder reported moving it to), and after ``progress_timeout_s``
without progress; the duplicate completion that may follow is dropped by task id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from admission_controller.results import Owed


@dataclass
class Task:
    task_id: str
    source: str
    frame_id: str
    # what the first worker gets: the frame's bytes (checked) or its model input (decoded);
    # None until the decode thread has done that
    x: np.ndarray | bytes | None
    created: float
    deadline: float | None = None
    label: int | None = None
    priority: float = 1.0
    attempt: int = 0
    dispatched_at: float = 0.0
    target: str | None = None  # the node holding it now, as far as this side knows
    origin: Any = None  # the ingest message: where to answer besides results/, what to ack
    trace: Any = None  # the frame's span, when the frame is traced (offramp.node.tracing)
    traceparent: str | None = None  # ... and its context, for the sample headers
    queued_at: float = 0.0  # when it last waited for credit (wall clock)

    def owed(self) -> Owed:
        """What its answer needs of it."""
        return Owed(self.task_id, self.source, self.frame_id, self.created, self.origin,
                    self.trace)


@dataclass
class Sweep:
    expired: list[Task] = field(default_factory=list)
    redispatch: list[Task] = field(default_factory=list)
    failed: list[Task] = field(default_factory=list)


class Tracker:
    def __init__(self, max_in_flight: int, progress_timeout_s: float, max_attempts: int) -> None:
        self.max_in_flight = max_in_flight
        self.progress_timeout_s = progress_timeout_s
        self.max_attempts = max_attempts
        self._tasks: dict[str, Task] = {}
        self._per_source: dict[str, int] = {}  # sources with frames in flight only
        self._occupied = asyncio.Event()  # set while some task is tracked
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def counted_sources(self) -> list[str]:
        """The sources the tracker keeps a count for: those with frames in flight."""
        return list(self._per_source)

    def in_flight(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def can_admit(self, source: str) -> bool:
        return self._per_source.get(source, 0) < self.max_in_flight

    async def occupied(self) -> None:
        """Return once some task is tracked (at once if one is)."""
        await self._occupied.wait()

    def add(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._per_source[task.source] = self._per_source.get(task.source, 0) + 1
        self._occupied.set()

    def dispatched(self, task: Task, now: float, target: str | None) -> None:
        task.attempt += 1
        task.dispatched_at = now
        task.target = target

    def _remove(self, task_id: str) -> Task | None:
        task = self._tasks.pop(task_id, None)
        if task is not None:
            left = self._per_source[task.source] - 1
            if left:
                self._per_source[task.source] = left
            else:
                del self._per_source[task.source]
            if not self._tasks:
                self._occupied.clear()
        return task

    def complete(self, task_id: str) -> Task | None:
        """The task a completion answers, or None for a duplicate or unknown id."""
        task = self._remove(task_id)
        if task is None:
            self.duplicates += 1
        return task

    def sweep(self, now: float, backlog_s: float = 0.0) -> Sweep:
        """Expired, stalled and failed tasks. ``backlog_s`` (the work queued along the path)
        extends the progress timeout, so that a loaded system is not mistaken for a dead one
        and flooded with duplicate dispatches."""
        out = Sweep()
        timeout = self.progress_timeout_s + 2 * backlog_s
        for task in list(self._tasks.values()):
            if task.deadline is not None and now >= task.deadline:
                out.expired.append(task)
            elif task.attempt > 0 and now - task.dispatched_at >= timeout:
                (out.redispatch if task.attempt < self.max_attempts else out.failed).append(task)
        for task in out.expired + out.failed:
            self._remove(task.task_id)
        return out

    def moved(self, task_id: str, attempt: int, node: str) -> None:
        """The holder of ``task_id`` passed it on to ``node`` (a report of that dispatch)."""
        task = self._tasks.get(task_id)
        if task is not None and task.attempt == attempt:
            task.target = node

    def refused(self, task_id: str, attempt: int) -> Task | None:
        """The task a worker could not take on its dispatch ``attempt`` (None when answered,
        or dispatched again since): no node holds it now."""
        task = self._tasks.get(task_id)
        if task is None or task.attempt != attempt:
            return None
        task.target = None
        return task

    def at_workers(self) -> int:
        """Tasks sent to a worker and not answered yet."""
        return sum(1 for t in self._tasks.values() if t.attempt > 0)

    def holders(self) -> set[str]:
        """The nodes holding some task now."""
        return {t.target for t in self._tasks.values() if t.target is not None}

    def lost(self, node: str) -> list[Task]:
        """Tasks ``node`` holds (it went offline or stopped serving): to dispatch again."""
        return [t for t in self._tasks.values() if t.target == node and
                t.attempt < self.max_attempts]

    def drain(self) -> list[Task]:
        tasks = list(self._tasks.values())
        for t in tasks:
            self._remove(t.task_id)
        return tasks
