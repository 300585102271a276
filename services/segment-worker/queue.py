"""The bounded per-segment queue of a worker and its dynamic micro-batching."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

from offramp.wire import Sample


@dataclass
class Item:
    """One sample waiting for a segment: its header, its activation row, the previous exit's
    embedding (feature-difference criterion) and when it arrived here."""

    sample: Sample
    x: np.ndarray
    prev: np.ndarray | None
    arrived: float


class SegmentQueue:
    """FIFO of at most ``maxsize`` samples. ``push`` returns what did not fit (the caller names,
    counts and answers for it); ``batch`` waits up to ``max_wait_s`` to fill a micro-batch."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Item] = deque()
        self._changed = asyncio.Event()
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, items: list[Item]) -> list[Item]:
        room = max(0, self.maxsize - len(self._items))
        taken, rejected = items[:room], items[room:]
        self._items.extend(taken)
        self.overflow += len(rejected)
        if taken:
            self._changed.set()
        return rejected

    async def wait_nonempty(self) -> None:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()

    async def batch(self, max_batch: int, max_wait_s: float) -> list[Item]:
        """Up to ``max_batch`` items: waits for the first, then at most ``max_wait_s`` more."""
        await self.wait_nonempty()
        if len(self._items) < max_batch and max_wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_wait_s
            while len(self._items) < max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
        n = min(max_batch, len(self._items))
        return [self._items.popleft() for _ in range(n)]

    def drain(self) -> list[Item]:
        items = list(self._items)
        self._items.clear()
        return items
