"""A bounded inbox with a named overflow policy, counted and logged (no hidden growth)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Overflow = Literal["drop-oldest", "drop-newest"]
OVERFLOWS: tuple[Overflow, ...] = ("drop-oldest", "drop-newest")


@dataclass(slots=True)
class InboxStats:
    accepted: int = 0
    dropped: int = 0
    high_water: int = 0


class Inbox(Generic[T]):
    """FIFO of at most ``maxsize`` items. ``put`` never blocks: when full, ``overflow`` says which
    item is discarded (the oldest queued, or the newcomer); every discard is counted and
    ``on_drop`` is called with the discarded item so the owner can answer for it."""

    def __init__(self, name: str, maxsize: int, overflow: Overflow = "drop-oldest",
                 on_drop: Callable[[str, T, int], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"inbox {name}: maxsize must be >= 1, got {maxsize}")
        if overflow not in OVERFLOWS:
            raise ValueError(f"inbox {name}: overflow must be one of {OVERFLOWS}, got {overflow!r}")
        self.name = name
        self.maxsize = maxsize
        self.overflow: Overflow = overflow
        self.stats = InboxStats()
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> bool:
        """Queue ``item``; return False if it (or an older item) had to be dropped."""
        kept = True
        if len(self._items) >= self.maxsize:
            self.stats.dropped += 1
            kept = False
            if self.overflow == "drop-newest":
                self._dropped(item)
                return False
            self._dropped(self._items.popleft())
        self._items.append(item)
        self.stats.accepted += 1
        self.stats.high_water = max(self.stats.high_water, len(self._items))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return kept

    def _dropped(self, item: T) -> None:
        if self._on_drop is not None:
            self._on_drop(self.name, item, self.stats.dropped)

    def get_nowait(self) -> T | None:
        return self._items.popleft() if self._items else None

    async def get(self) -> T:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items


class RateLimitedWarning:
    """Log a recurring condition at most once per ``period_s``, with the count since the last line."""

    def __init__(self, period_s: float = 1.0) -> None:
        self._period = period_s
        self._last: float | None = None
        self._pending = 0

    def should_log(self) -> int:
        """Count one occurrence; return how many to report now, or 0 to stay quiet."""
        self._pending += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self._period:
            return 0
        self._last = now
        count, self._pending = self._pending, 0
        return count
