"""Concurrent QoS 1 publishing with a bound: a loop that waits for each PUBACK before its next
message answers at one message per broker round trip (measured: ~140 results/s); an Outbox
keeps up to ``bound`` publishes in flight and makes the caller wait beyond that."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Outbox:
    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"outbox bound must be >= 1, got {bound}")
        self.bound = bound
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def send(self, publish: Coroutine[Any, Any, None]) -> None:
        """Start ``publish``; wait first while ``bound`` publishes are in flight."""
        while len(self._tasks) >= self.bound:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(publish)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout: float | None) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
