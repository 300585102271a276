"""A load generator for a running system: several sources publishing at given rates, every
result, heartbeat and plan recorded. The control tests and ``make bench-control`` drive the
system through it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from offramp.bus import Bus, Topics, from_payload
from offramp.bus.outbox import Outbox
from offramp.local.client import png_bytes, wait_for_workers
from offramp.ml.data import Split
from offramp.settings import BusSettings
from offramp.wire import FrameEnvelope, Heartbeat, Plan, Result, read_results


@dataclass(frozen=True)
class Stream:
    source: str
    rate: float  # frames per second
    seconds: float


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    beats: list[Heartbeat] = field(default_factory=list)
    plans: list[tuple[float, Plan]] = field(default_factory=list)  # (monotonic time, plan)
    offered: Counter[str] = field(default_factory=Counter)
    labels: dict[str, int] = field(default_factory=dict)  # frame id -> true label
    sent_at: dict[str, float] = field(default_factory=dict)  # frame id -> wall time sent
    sent_s: dict[str, float] = field(default_factory=dict)  # source -> seconds its sending took
    started: float = 0.0
    finished: float = 0.0

    def by_source(self, source: str) -> list[Result]:
        return [r for r in self.results if r.source == source]

    def accuracy(self, source: str | None = None, *, over_offered: bool = False) -> float:
        """Share of answered (or, ``over_offered``, of all offered) frames answered right."""
        rs = self.results if source is None else self.by_source(source)
        right = sum(1 for r in rs if r.status == "ok" and r.label == self.labels.get(r.frame_id))
        total = (sum(self.offered.values()) if source is None else self.offered[source]) \
            if over_offered else sum(1 for r in rs if r.status == "ok")
        return right / total if total else 0.0


Hook = Callable[[Bus, Run], Awaitable[None]]
WINDOW = 64  # QoS 1 publishes of a stream awaiting their acknowledgement at once


async def drive(url: str, prefix: str, workers: int, streams: Sequence[Stream], frames: Split,
                *, during: Hook | None = None, settle_s: float = 20.0,
                warmup_s: float = 1.5) -> Run:
    """Publish every stream (paced, QoS 1: every frame reaches the broker and is owed a
    result), cycling through ``frames`` (their labels say which answers are right), then
    wait until each frame is answered or ``settle_s`` passes; returns everything seen."""
    topics = Topics(prefix)
    settings = BusSettings(broker_url=url, topic_prefix=prefix, session_expiry_s=60,
                           reconnect_max_s=0.5, publish_timeout_s=30)
    run = Run()
    async with Bus(settings, f"loadgen-{os.getpid()}-{time.monotonic_ns()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, workers, 60)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=500_000,
                                      decode=from_payload(read_results))
        states = await bus.subscribe(topics.state_all(), maxsize=200_000,
                                     decode=from_payload(Heartbeat.decode))
        plans = await bus.subscribe(topics.plan(), maxsize=1000, decode=from_payload(Plan.decode))
        await asyncio.sleep(warmup_s)  # the first plan and exit policy are out

        async def read() -> None:
            async for answers in results:  # a refusal answers many frames
                run.results.extend(answers)

        async def watch() -> None:
            async for hb in states:
                run.beats.append(hb)

        async def watch_plans() -> None:
            async for plan in plans:
                run.plans.append((time.monotonic(), plan))

        camera = _Camera(bus, topics, run, frames)

        async with asyncio.TaskGroup() as tg:
            readers = [tg.create_task(c) for c in (read(), watch(), watch_plans())]
            run.started = time.monotonic()
            async with asyncio.TaskGroup() as send:
                for s in streams:
                    send.create_task(camera.publish(s))
                if during is not None:
                    await during(bus, run)
            total = sum(run.offered.values())
            deadline = time.monotonic() + settle_s
            while len(run.results) < total and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            run.finished = time.monotonic()
            await asyncio.sleep(1.0)  # a frame answered twice would show up now
            for t in readers:
                t.cancel()
    return run


class _Camera:
    """The streams' publisher: digits envelopes with frame ids unique across runs (no
    redelivery dedup), each image PNG-encoded once (the camera's CPU is not what is measured)."""

    def __init__(self, bus: Bus, topics: Topics, run: Run, frames: Split) -> None:
        self.bus = bus
        self.topics = topics
        self.run = run
        self.images = frames.images
        self.labels = frames.labels
        self.tag = f"{time.time_ns():x}"
        self.pngs: dict[int, bytes] = {}

    async def _one(self, topic: str, payload: bytes) -> None:
        await self.bus.publish(topic, payload, qos=1)

    async def publish(self, s: Stream) -> None:
        """Paced, with up to WINDOW publishes awaiting their acknowledgement at once (a camera's
        MQTT client keeps several in flight; one at a time would cap the rate at one frame per
        broker round trip)."""
        n = int(s.rate * s.seconds)
        topic = self.topics.ingest(s.source)
        run = self.run
        start = time.monotonic()
        async with Outbox(WINDOW, grace_s=None) as outbox:
            for i in range(n):
                delay = start + i / s.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                j = i % len(self.images)
                frame_id = f"{s.source}/{self.tag}/{i}"
                run.labels[frame_id] = int(self.labels[j])
                if j not in self.pngs:
                    self.pngs[j] = png_bytes(self.images[j])
                now = time.time()
                payload = FrameEnvelope(frame_id=frame_id, ts=now, image=self.pngs[j]).encode()
                run.sent_at[frame_id] = now
                await outbox.send(self._one(topic, payload))
                run.offered[s.source] += 1
        run.sent_s[s.source] = time.monotonic() - start
