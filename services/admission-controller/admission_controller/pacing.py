"""Telling each camera the rate its frames are taken at (``control/pace/<source>``, retained;
docs/wire.md, "Pace"): the advice of :class:`offramp.policy.pace.Pacer`, said by the active
member of the group only, and withdrawn (an empty retained message) when a source is
forgotten or the controller stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from admission_controller.gate import Gate
from offramp.bus import Topics
from offramp.errors import BusError
from offramp.policy.pace import Load, Pacer
from offramp.wire import Pace

Publish = Callable[[str, bytes], Awaitable[None]]


class Pacing:
    def __init__(self, pacer: Pacer, *, gate: Gate[Any], in_flight: Callable[[str], int],
                 publish: Publish, topics: Topics, node: str, active: Callable[[], bool],
                 log: Any) -> None:
        self.pacer = pacer
        self.gate = gate
        self.in_flight = in_flight
        self.publish = publish
        self.topics = topics
        self.node = node
        self.active = active
        self.log = log
        self.told = 0  # paces published
        self.withdrawn = 0

    def advice(self, now: float, wall: float) -> list[tuple[str, bytes]]:
        """What to publish now: a pace per source whose advice changed, an empty payload per
        source forgotten since (its retained pace withdrawn)."""
        out: list[tuple[str, bytes]] = []
        sources = set(self.gate.sources())
        for source in sources:
            arrived, admitted = self.gate.counts(source)
            load = Load(arrived, admitted, self.in_flight(source) + self.gate.waiting(source))
            rate = self.pacer.update(source, load, now, self.gate.rate(source))
            if rate is not None:
                pace = Pace(source=source, rate_hz=rate, by=self.node, ts=wall,
                            valid_s=self.pacer.c.valid_s)
                out.append((source, pace.to_json()))
        for source in self.pacer.sources():
            if source not in sources and self.pacer.forget(source):
                out.append((source, b""))
        return out

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not self.active():
                continue
            for source, payload in self.advice(time.monotonic(), time.time()):
                await self._say(source, payload)

    async def withdraw(self) -> None:
        """Withdraw every pace told (the controller stops: a camera must not follow a rate
        nobody measures)."""
        for source in self.pacer.sources():
            if self.pacer.forget(source):
                await self._say(source, b"")

    async def _say(self, source: str, payload: bytes) -> None:
        try:
            await self.publish(self.topics.pace(source), payload)
        except BusError as exc:
            self.log.warning("pace_not_told", source=source, error=str(exc))
            return
        if payload:
            self.told += 1
        else:
            self.withdrawn += 1
