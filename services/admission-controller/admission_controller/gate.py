"""The admission gate per source: the ``rate`` strategy's token bucket, its adapted rate and
its small bounded waiting buffer. With ``none`` or ``threshold`` every frame passes (the
in-flight bound still applies). Pure: the clock is passed in."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from offramp.policy.admission import ControlSettings, RateController, TokenBucket

T = TypeVar("T")
Verdict = Literal["admit", "wait", "drop"]


@dataclass
class _Source(Generic[T]):
    controller: RateController
    bucket: TokenBucket
    waiting: deque[T] = field(default_factory=deque)
    arrivals: int = 0
    admitted: int = 0
    dropped: int = 0


class Gate(Generic[T]):
    def __init__(self, settings: ControlSettings) -> None:
        self.s = settings
        self._sources: dict[str, _Source[T]] = {}

    @property
    def adaptive(self) -> bool:
        return self.s.strategy == "rate"

    def _source(self, source: str, now: float) -> _Source[T]:
        src = self._sources.get(source)
        if src is None:
            ctl = RateController(self.s)
            src = self._sources[source] = _Source(ctl, TokenBucket(ctl.rate, self.s.burst_s, now))
        return src

    def offer(self, source: str, item: T, now: float) -> Verdict:
        """Admit ``item`` now, keep it waiting (``release`` hands it back later) or drop it."""
        src = self._source(source, now)
        src.arrivals += 1
        if not self.adaptive or (not src.waiting and src.bucket.take(now)):
            src.admitted += 1
            return "admit"
        if len(src.waiting) < self.s.buffer:
            src.waiting.append(item)
            return "wait"
        src.dropped += 1
        return "drop"

    def release(self, now: float) -> list[tuple[str, T]]:
        """Waiting items whose turn has come, per the admitted rate."""
        out = []
        for name, src in self._sources.items():
            while src.waiting and src.bucket.take(now):
                out.append((name, src.waiting.popleft()))
                src.admitted += 1
        return out

    def tick(self, backlogs: dict[str, float]) -> None:
        """Adapt every source's admitted rate to its path backlog (seconds)."""
        if not self.adaptive:
            return
        for name, src in self._sources.items():
            src.bucket.rate = src.controller.update(backlogs.get(name, 0.0))

    def sources(self) -> list[str]:
        return list(self._sources)

    def counts(self, source: str) -> tuple[int, int]:
        """Frames of ``source`` offered to the gate and admitted so far ((0, 0): unknown)."""
        src = self._sources.get(source)
        return (src.arrivals, src.admitted) if src is not None else (0, 0)

    def rate(self, source: str) -> float | None:
        """The admitted rate of ``source`` (None: no rate is enforced, or it is unknown)."""
        src = self._sources.get(source)
        return src.bucket.rate if src is not None and self.adaptive else None

    def waiting(self, source: str) -> int:
        src = self._sources.get(source)
        return len(src.waiting) if src is not None else 0

    def forget(self, source: str) -> None:
        """Drop an idle source's state (its next frame starts it afresh)."""
        self._sources.pop(source, None)

    def _busiest(self, limit: int | None) -> list[tuple[str, _Source[T]]]:
        """Every source, or the ``limit`` with the most arrivals (what a heartbeat says)."""
        if limit is None:
            return list(self._sources.items())
        return sorted(self._sources.items(), key=lambda kv: kv[1].arrivals, reverse=True)[:limit]

    def arrivals(self, limit: int | None = None) -> dict[str, float]:
        """Frames received per source since it was tracked (the ``limit`` busiest)."""
        return {name: float(src.arrivals) for name, src in self._busiest(limit)}

    def stats(self, limit: int | None = None) -> dict[str, float]:
        """Per source: admitted rate, admitted, dropped and waiting (the ``limit`` busiest)."""
        out: dict[str, float] = {}
        for name, src in self._busiest(limit):
            out[f"admitted_rate:{name}"] = round(src.bucket.rate if self.adaptive else 0.0, 3)
            out[f"admitted:{name}"] = float(src.admitted)
            out[f"gate_dropped:{name}"] = float(src.dropped)
            out[f"waiting:{name}"] = float(len(src.waiting))
        return out

    def drain(self) -> list[tuple[str, T]]:
        out = [(name, it) for name, src in self._sources.items() for it in src.waiting]
        for src in self._sources.values():
            src.waiting.clear()
        return out
