"""What a node's link really carries, for placement by bytes (MDI-Exit's cost of a hand-over:
bytes over the link's rate plus its round trip).

The measure is the kernel's own TCP accounting of the node's connection to the broker (every
packet a node sends to any peer leaves on it): bytes the other end acknowledged over the time
the connection was busy sending. Idle time is not counted, so a lightly used link is not taken
for a slow one. A window closes once it holds ``min_bytes`` acknowledged, so that the round
trips of small messages (heartbeats, reports) do not dominate it, and ``min_busy_s`` of busy
time (the kernel counts busy time in clock ticks, 1-10 ms); the rate is an exponentially
weighted mean of closed windows, and 0 until the first closes (unknown: callers then count a
transfer as its round trip only).

Pure: the counters come from :func:`offramp.bus.tcp_info.read` (or a test).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class LinkMeter:
    def __init__(self, *, min_bytes: int = 256 * 1024, min_busy_s: float = 0.05,
                 weight: float = 0.3) -> None:
        if min_bytes <= 0 or min_busy_s <= 0 or not 0 < weight <= 1:
            raise ValueError("min_bytes and min_busy_s must be positive and weight in (0, 1]")
        self.min_bytes = min_bytes
        self.min_busy_us = int(min_busy_s * 1e6)
        self.weight = weight
        self.bytes_per_s = 0.0
        self.rtt_s = 0.0
        self.windows = 0  # closed so far
        self._start: tuple[int, int] | None = None  # (bytes acked, busy us) opening the window

    def observe(self, bytes_acked: int, busy_us: int, rtt_us: int) -> None:
        """One reading of the connection's cumulative counters (and its smoothed round trip)."""
        if rtt_us > 0:
            self.rtt_s = rtt_us / 1e6
        start = self._start
        if start is None or bytes_acked < start[0] or busy_us < start[1]:
            self._start = (bytes_acked, busy_us)  # the first, or a new connection's counters
            return
        acked, busy = bytes_acked - start[0], busy_us - start[1]
        if acked < self.min_bytes or busy < self.min_busy_us:
            return
        rate = acked / (busy / 1e6)
        self.bytes_per_s = rate if self.windows == 0 else (
            (1 - self.weight) * self.bytes_per_s + self.weight * rate)
        self.windows += 1
        self._start = (bytes_acked, busy_us)


class PathMeter:
    """What each sender's packets get on their way to this node: bytes over the time they
    arrived back to back. A packet sent before the one ahead of it from the same sender had
    arrived travelled right behind it, so the gap between their arrivals is its transfer at
    the path's bottleneck (the sender's link, the broker's, or this node's); a packet sent
    into an idle path says nothing and is skipped. Windows and the mean are as
    :class:`LinkMeter`'s. The send time is the sender's clock: clocks must agree to well
    under a packet's transfer time (NTP does, for the packets whose rate matters).
    """

    def __init__(self, *, min_bytes: int = 256 * 1024, min_busy_s: float = 0.05,
                 weight: float = 0.3, max_senders: int = 64) -> None:
        if min_bytes <= 0 or min_busy_s <= 0 or not 0 < weight <= 1 or max_senders <= 0:
            raise ValueError("min_bytes, min_busy_s and max_senders must be positive and "
                             "weight in (0, 1]")
        self.min_bytes = min_bytes
        self.min_busy_s = min_busy_s
        self.weight = weight
        self.max_senders = max_senders
        self._paths: dict[str, _Path] = {}

    def senders(self) -> list[str]:
        """The senders whose path is measured now, oldest first (at most ``max_senders``)."""
        return list(self._paths)

    def observe(self, sender: str, nbytes: int, sent: float, arrived: float) -> None:
        path = self._paths.pop(sender, None)  # re-inserted last: the dict is oldest first
        if path is None:
            path = _Path(arrived)
            if len(self._paths) >= self.max_senders:
                del self._paths[next(iter(self._paths))]
        elif sent <= path.last_arrival and arrived > path.last_arrival:
            path.bytes += nbytes
            path.busy_s += arrived - path.last_arrival
            if path.bytes >= self.min_bytes and path.busy_s >= self.min_busy_s:
                rate = path.bytes / path.busy_s
                path.rate = rate if path.rate == 0 else (
                    (1 - self.weight) * path.rate + self.weight * rate)
                path.bytes, path.busy_s = 0, 0.0
        path.last_arrival = max(path.last_arrival, arrived)
        self._paths[sender] = path

    def rates(self) -> dict[str, float]:
        """Bytes/s from each sender measured so far (senders not yet measured left out)."""
        return {s: p.rate for s, p in self._paths.items() if p.rate > 0}


class _Path:
    __slots__ = ("busy_s", "bytes", "last_arrival", "rate")

    def __init__(self, arrived: float) -> None:
        self.last_arrival = arrived
        self.bytes = 0
        self.busy_s = 0.0
        self.rate = 0.0


class QueuePeak:
    """The longest this node's outgoing queue took to drain, over the last ``window_s``: what
    it says in its heartbeat (``queue_s``). Sampled after every activation packet it publishes
    and at every heartbeat, so a burst queued between two heartbeats is in the next one; the
    others give the node twice that before they call it silent. Clock-free: times are given."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (time, seconds), decreasing s

    def add(self, now: float, seconds: float) -> None:
        while self._samples and self._samples[-1][1] <= seconds:
            self._samples.pop()  # a later, longer queue supersedes shorter earlier ones
        self._samples.append((now, seconds))

    def value(self, now: float) -> float:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        return self._samples[0][1] if self._samples else 0.0


def paced(parts: Sequence[tuple[str, int]], local: str, sample_bytes: float,
          budget_bytes: float) -> list[tuple[str, int]]:
    """``parts`` (node, samples) with the samples for other nodes than ``local`` cut to what
    ``budget_bytes`` of the outgoing queue holds, in order; the local part is kept whole.
    With any budget left, at least one sample goes (a sample larger than the budget must
    still go some time); with none, nothing does."""
    out = []
    room = budget_bytes
    sent_any = False
    for node, n in parts:
        if node == local:
            out.append((node, n))
            continue
        fits = int(room // sample_bytes) if sample_bytes > 0 else n
        if not sent_any and room > 0:
            fits = max(fits, 1)
        take = max(0, min(n, fits))
        room -= take * sample_bytes
        sent_any = sent_any or take > 0
        out.append((node, take))
    return out
