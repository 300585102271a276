"""Which sources the admission-controller keeps state for: at most ``max_sources`` at once.

Every source has state in the gate (its token bucket and admitted rate) and in the metrics'
labels, and is said in the heartbeat. A camera that names its frames' source from a counter
would grow all of them without end, so the table is bounded: a new source takes the place of
the one seen longest ago once that one has been idle ``idle_s`` (and holds no frame), and is
refused while every tracked source is active. Pure: the clock and the busy test are passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Tracked:
    """What :meth:`SourceTable.track` decided: ``tracked`` (frames of it are admitted) and the
    source it evicted to make room, if any, whose state its owner forgets."""

    tracked: bool
    evicted: str | None = None


class SourceTable:
    def __init__(self, max_sources: int, idle_s: float) -> None:
        self.max_sources = max_sources
        self.idle_s = idle_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # source -> last frame, oldest first
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, source: object) -> bool:
        return source in self._seen

    def track(self, source: str, now: float, busy: Callable[[str], bool]) -> Tracked:
        """A frame of ``source`` at ``now``. O(1): only the source seen longest ago can make
        room, since every other was seen more recently."""
        if source in self._seen:
            self._seen[source] = now
            self._seen.move_to_end(source)
            return Tracked(True)
        evicted = None
        if len(self._seen) >= self.max_sources:
            oldest, last = next(iter(self._seen.items()))
            if now - last < self.idle_s or busy(oldest):
                self.refused += 1
                return Tracked(False)
            del self._seen[oldest]
            self.evicted += 1
            evicted = oldest
        self._seen[source] = now
        return Tracked(True, evicted)
