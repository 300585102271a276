"""The bounded per-segment queue of a worker: weighted priority with ageing (docs/algorithms.md
3.2), priority-aware overflow, and dynamic micro-batching."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from offramp.model.resident import Activation
from offramp.policy.priority import urgency
from offramp.wire import Sample


@dataclass
class Item:
    """One sample waiting for a segment: its header, its activation row (on the host, or on
    the device after a resident hand-over), the previous exit's embedding (feature-difference
    criterion), when it arrived here and when its packet was sent (wall clock; the same for a
    hand-over between segments of this node)."""

    sample: Sample
    x: Activation
    prev: np.ndarray | None
    arrived: float
    sent: float = 0.0


class SegmentQueue:
    """At most ``maxsize`` samples, one FIFO per priority. Within a priority the oldest is the
    most urgent, so only the heads compete: picking a batch is O(batch x priorities).

    ``push`` returns what did not fit (the caller names, counts and answers for it). When the
    queue is full, a sample of higher priority than the lowest one queued takes the place of
    the newest lowest-priority sample, which is returned instead."""

    def __init__(self, maxsize: int, ageing_s: float = 0.5) -> None:
        self.maxsize = maxsize
        self.ageing_s = ageing_s
        self._classes: dict[float, deque[Item]] = {}
        self._len = 0
        self._changed = asyncio.Event()
        self.overflow = 0

    def __len__(self) -> int:
        return self._len

    def by_priority(self) -> tuple[tuple[float, int], ...]:
        return tuple((p, len(q)) for p, q in sorted(self._classes.items(), reverse=True) if q)

    def push(self, items: list[Item]) -> list[Item]:
        rejected: list[Item] = []
        for it in items:
            if self._len >= self.maxsize:
                victim = self._evict_below(it.sample.priority)
                if victim is None:
                    rejected.append(it)
                    continue
                rejected.append(victim)
            self._classes.setdefault(it.sample.priority, deque()).append(it)
            self._len += 1
        self.overflow += len(rejected)
        if len(rejected) < len(items):
            self._changed.set()
        return rejected

    def _evict_below(self, priority: float) -> Item | None:
        lowest = min((p for p, q in self._classes.items() if q), default=None)
        if lowest is None or lowest >= priority:
            return None
        self._len -= 1
        return self._classes[lowest].pop()

    def pop(self, n: int, now: float | None = None) -> list[Item]:
        """The ``n`` most urgent items, most urgent first."""
        now = time.time() if now is None else now
        out: list[Item] = []
        while len(out) < n and self._len:
            best = max((q for q in self._classes.values() if q),
                       key=lambda q: urgency(q[0].sample.priority, now - q[0].arrived,
                                             self.ageing_s))
            out.append(best.popleft())
            self._len -= 1
        return out

    async def wait_nonempty(self) -> None:
        while not self._len:
            self._changed.clear()
            await self._changed.wait()

    async def batch(self, max_batch: int, max_wait_s: float) -> list[Item]:
        """Up to ``max_batch`` items: waits for the first, then at most ``max_wait_s`` more."""
        await self.wait_nonempty()
        if self._len < max_batch and max_wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_wait_s
            while self._len < max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:  # asyncio.timeout: a cancel never turns into a timeout (3.11 wait_for)
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    break
        return self.pop(max_batch)

    def drain(self) -> list[Item]:
        items = [it for q in self._classes.values() for it in q]
        self._classes.clear()
        self._len = 0
        return items
