"""Frames shed under load, answered together: one refusal per source each interval, listing
the refused frames' ids by reason (:class:`~offramp.wire.Refusal`), instead of one result per
frame. At twice the capacity, half of all frames are refused; published one by one (JSON, a
QoS 1 round trip each) they took most of the admission-controller's core and the results of
admitted frames waited behind them. Here a refused frame costs a list append, and its
acknowledgement to the broker.

A frame that came with an MQTT v5 response topic is listed in the refusal sent there too (one
per response topic, without correlation data: the ids are in the message). Each frame is
acknowledged to the broker once every refusal naming it is at the broker; a crash before that
hands it to the next admission-controller, which answers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from admission_controller.answers import Answers, Told
from offramp.bus import Message, Topics
from offramp.errors import OfframpError
from offramp.wire import Refusal

Publish = Callable[[str, bytes], Awaitable[None]]  # topic, payload (QoS 1)
Acknowledge = Callable[[Message], None]
Count = Callable[[str, int], None]  # source, frames refused
MAX_IDS = 1000  # frame ids per refusal message (ids are at most 256 characters)


@dataclass
class _Pending:
    """One source's refusals since the last flush."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)
    by_reply: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    origins: list[Message] = field(default_factory=list)
    again: int = 0  # frames refused before and told so again: not counted a second time


class Refusals:
    def __init__(self, *, topics: Topics, publish: Publish, acknowledge: Acknowledge,
                 count: Count, log: Any, interval_s: float, max_pending: int,
                 answers: Answers | None = None) -> None:
        self.topics = topics
        self.answers = answers
        self.publish = publish
        self.acknowledge = acknowledge
        self.count = count
        self.log = log
        self.interval_s = interval_s
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self._size = 0
        self._full = asyncio.Event()
        self._some = asyncio.Event()  # set while some refusal is pending
        self.failed = 0  # ... that could not be (their frames stay unacknowledged)

    def __len__(self) -> int:
        return self._size

    def add(self, source: str, frame_id: str, reason: str, origin: Message | None, *,
            again: bool = False) -> None:
        """Refuse one frame; it is answered at the next flush. ``again``: it was refused
        before and is sent again (told the same, counted once)."""
        p = self._pending.setdefault(source, _Pending())
        if again:
            p.again += 1
        elif self.answers is not None:
            self.answers.keep(source, frame_id, Told(refused=reason), time.monotonic())
        p.by_reason.setdefault(reason, []).append(frame_id)
        if origin is not None:
            p.origins.append(origin)
            if origin.response_topic is not None:
                p.by_reply.setdefault(origin.response_topic, {}).setdefault(
                    reason, []).append(frame_id)
        self._size += 1
        self._some.set()
        if self._size >= self.max_pending:
            self._full.set()

    async def run(self) -> None:
        """Flush ``interval_s`` after the first refusal pending, or at once when
        ``max_pending`` frames wait. With none pending it sleeps: no timer while not refusing."""
        while True:
            await self._some.wait()
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._full.wait()
            except TimeoutError:
                pass
            await self.flush()

    async def flush(self) -> None:
        """Publish what is pending, then acknowledge its frames."""
        pending, self._pending, self._size = self._pending, {}, 0
        self._full.clear()
        self._some.clear()
        now = time.time()
        for source, p in pending.items():
            sent = await self._send(self.topics.results(source), source, p.by_reason, now)
            for reply, frames in p.by_reply.items():
                sent = await self._send(reply, source, frames, now) and sent
            if sent:  # else unacknowledged: the broker hands them out again
                self.count(source, sum(len(ids) for ids in p.by_reason.values()) - p.again)
                for msg in p.origins:
                    self.acknowledge(msg)

    def forget(self) -> None:
        """Drop what is pending unanswered and unacknowledged: another member holds the
        ingest session now, and the broker hands these frames to it."""
        self._pending, self._size = {}, 0
        self._some.clear()

    async def _send(self, topic: str, source: str, frames: dict[str, list[str]],
                    now: float) -> bool:
        try:
            for part in _parts(frames):
                await self.publish(topic, Refusal(source=source, frames=part, ts=now).to_json())
        except OfframpError as exc:
            self.failed += 1
            self.log.error("refusal_not_published", source=source, topic=topic, error=str(exc),
                           frames=sum(len(ids) for ids in frames.values()))
            return False
        return True


def _parts(frames: dict[str, list[str]]) -> list[dict[str, list[str]]]:
    """``frames`` in messages of at most MAX_IDS ids."""
    pairs = [(reason, frame_id) for reason, ids in frames.items() for frame_id in ids]
    parts = []
    for start in range(0, len(pairs), MAX_IDS):
        part: dict[str, list[str]] = {}
        for reason, frame_id in pairs[start:start + MAX_IDS]:
            part.setdefault(reason, []).append(frame_id)
        parts.append(part)
    return parts
