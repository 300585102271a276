"""The pace told to each camera (docs/algorithms.md 1.4), pure and clock-free.

A camera that sends faster than the system serves its frames gets the surplus answered
``dropped``: the bytes crossed its uplink, the broker and the admission-controller for nothing.
So every interval the admission-controller tells each source the rate it takes its frames at
now, and a camera that follows it skips the surplus at the camera.

The advice steers the source's frames in flight towards ``target`` x the in-flight bound
``B`` (the bound is where frames are refused). With ``o`` the fraction of the bound in use at
the end of an interval of ``dt`` seconds:

    rate = clip(base + gain (target - o) B / dt, shrink x base, grow x base)

``base`` is the rate the source's frames were served at (smoothed), or, when nothing held the
source back (``o < target`` and no backlog drained), the larger of that and its arrival rate.
The second term is the backlog the source may gain (or must lose) over the next interval to
approach the target: the increase is additive and bounded by the room left below the bound,
so probing for capacity cannot overrun the bound within an interval, and a source over its
share falls below what it is served at until its backlog is back at the target, before any
frame is refused. A source that sent nothing over an interval keeps what it was told: it comes
back at the rate it left at, not at one measured while it was silent. Under the ``rate``
strategy the rate is also at most ``under_ceiling`` x the source's admitted rate (the token
bucket refuses what is above it; the margin is for frames the network bunches), told from the
first interval on. A told rate is said again when it changes by ``change`` or after
``refresh_s``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """A source's counters at one instant: frames offered to admission and admitted so far,
    and admitted frames not answered yet (in flight or waiting)."""

    arrived: int
    admitted: int
    in_flight: int


@dataclass(frozen=True)
class PaceConfig:
    bound: int  # frames in flight per source beyond which frames are refused
    target: float = 0.5  # the fraction of ``bound`` the advice aims to keep in flight
    gain: float = 0.5  # the share of the way to the target backlog taken per interval
    shrink: float = 0.5  # lowest factor per interval
    grow: float = 1.5  # highest factor per interval
    floor_hz: float = 1.0  # never advise less: a source must be able to come back
    under_ceiling: float = 0.95  # the share of an enforced admitted rate told
    smoothing: float = 0.5  # EWMA weight of the newest interval's served rate
    change: float = 0.05  # a new advice is told when it differs this much (relative) ...
    refresh_s: float = 5.0  # ... or when the last was told this long ago
    valid_s: float = 15.0  # a told pace holds this long unless told again (three refreshes)


@dataclass
class _Source:
    last: Load
    at: float
    served_hz: float | None = None
    told: float | None = None
    told_at: float = 0.0


class Pacer:
    def __init__(self, config: PaceConfig) -> None:
        self.c = config
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def sources(self) -> list[str]:
        return list(self._sources)

    def advised(self, source: str) -> float | None:
        """The rate last told to ``source`` (None: none yet)."""
        src = self._sources.get(source)
        return src.told if src is not None else None

    def forget(self, source: str) -> bool:
        """Drop a source's state; True when it had been told a rate (to withdraw)."""
        src = self._sources.pop(source, None)
        return src is not None and src.told is not None

    def update(self, source: str, load: Load, now: float,
               ceiling_hz: float | None = None) -> float | None:
        """The rate to tell ``source`` now, or None when what it was told still holds (or,
        at its first interval, nothing is known yet)."""
        src = self._sources.get(source)
        if src is None:
            src = self._sources[source] = _Source(load, now)
            if ceiling_hz is None:
                return None
            src.told, src.told_at = self._below(ceiling_hz), now
            return src.told
        dt = now - src.at
        if dt <= 0:
            return None
        served = max(0, (load.admitted - load.in_flight) - (src.last.admitted - src.last.in_flight))
        arrived = max(0, load.arrived - src.last.arrived)
        src.last, src.at = load, now
        if not arrived and not served:
            return None  # silent: what it was told still holds
        a = self.c.smoothing
        served_hz = served / dt
        src.served_hz = served_hz if src.served_hz is None else \
            a * served_hz + (1 - a) * src.served_hz
        occupancy = load.in_flight / self.c.bound
        free = occupancy < self.c.target and arrived >= served  # nothing held it back
        base = max(src.served_hz, arrived / dt) if free else src.served_hz
        # frames the backlog may gain (or must lose) over the next interval to reach the target
        room = self.c.gain * (self.c.target - occupancy) * self.c.bound / dt
        rate = max(self.c.floor_hz, min(base + room, base * self.c.grow), base * self.c.shrink)
        if ceiling_hz is not None:
            rate = max(self.c.floor_hz, min(rate, self._below(ceiling_hz)))
        if src.told is not None and abs(rate - src.told) <= self.c.change * src.told \
                and now - src.told_at < self.c.refresh_s:
            return None
        src.told, src.told_at = rate, now
        return rate

    def _below(self, ceiling_hz: float) -> float:
        """A little under the admitted rate: frames that a network bunches still fit the
        token bucket."""
        return max(self.c.floor_hz, ceiling_hz * self.c.under_ceiling)
