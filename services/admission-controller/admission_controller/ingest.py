"""From ``ingest/+`` to admitted tasks: frames decoded off the event loop, redeliveries
recognised, each frame given a task id and either admitted (tracker, gate, dispatcher) or
answered at once (``error``, ``dropped``). Frames the ingest inbox could not hold are answered
``dropped``; frames taken but not answered when the service stops are answered ``error``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from admission_controller.frames import Frame, decode_frames
from admission_controller.gate import Gate
from admission_controller.results import Results
from admission_controller.settings import AdmissionSettings
from admission_controller.tracker import Task, Tracker
from offramp.bus import Message, Subscription, Topics
from offramp.bus.inbox import RateLimitedWarning
from offramp.errors import TopicError
from offramp.model.inputs import FrameError, InputSpec
from offramp.node.metrics import Metrics
from offramp.node.sources import SourceRegistry
from offramp.wire import Status

DECODE_BATCH = 32  # frames per hand-off to the decode thread
DEDUP_MAX = 1_000_000  # (source, frame id) pairs remembered at most


class Ingest:
    def __init__(self, settings: AdmissionSettings, spec: InputSpec, *, topics: Topics,
                 registry: SourceRegistry, tracker: Tracker, gate: Gate[Task],
                 submit: Callable[[list[Task]], None], results: Results,
                 new_id: Callable[[], str], metrics: Metrics, log: Any) -> None:
        self.s = settings
        self.spec = spec
        self.topics = topics
        self.registry = registry
        self.tracker = tracker
        self.gate = gate
        self.submit = submit
        self.results = results
        self.new_id = new_id
        self.log = log
        self.counts = results.counts
        self.in_hand: deque[Message] = deque()  # taken from the inbox, not yet answered
        self.stopping = threading.Event()  # tells the decode thread to leave the rest
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.overflowed: list[Message] = []
        self._overflow = asyncio.Event()
        self._bad_source = RateLimitedWarning()
        self.m_frames = metrics.counter("offramp_frames_total", "Frames received at ingest, by "
                                        "source", ["source"])
        self.m_drops = metrics.counter("offramp_drops_total", "Frames answered 'dropped' (or "
                                       "not answerable), by reason", ["reason"])

    async def run(self, sub: Subscription[Message]) -> None:
        """Frames are decoded off the event loop, up to DECODE_BATCH per hand-off to the decode
        thread: a hand-off per frame cost more than decoding a small frame does."""
        loop = asyncio.get_running_loop()
        decode = partial(decode_frames, spec=self.spec,
                         max_bytes=self.s.common.bus.max_message_bytes,
                         max_pixels=self.s.max_pixels, stop=self.stopping)
        while True:
            self.in_hand.append(await sub.get())
            while len(self.in_hand) < DECODE_BATCH and (more := sub.get_nowait()):
                self.in_hand.append(more)
            frames = await loop.run_in_executor(self.decoder, decode,
                                                [m.payload for m in self.in_hand])
            for frame in frames:
                msg = self.in_hand[0]
                source = self._source(msg)
                if source is not None:
                    self.counts["frames"] += 1
                    self.m_frames.labels(source=source).inc()
                    task_id = self.new_id()
                    if isinstance(frame, FrameError):
                        await self.results.answer(task_id, source, f"{source}-{task_id}",
                                                  "error", error=str(frame))
                    else:
                        await self.admit(source, task_id, frame)
                self.in_hand.popleft()  # only now: a stop meanwhile answers it (unanswered)

    def _source(self, msg: Message) -> str | None:
        """The source of an ingest topic; None (logged, counted) for a name no results topic
        can be made of, which no client could read an answer on."""
        try:
            return self.topics.parse(msg.topic).source
        except TopicError as exc:
            self.counts["invalid_sources"] += 1
            self.m_drops.labels(reason="invalid-source").inc()
            if n := self._bad_source.should_log():
                self.log.warning("invalid_source", topic=msg.topic[:300], error=str(exc), count=n)
            return None

    def duplicate(self, source: str, frame_id: str | None, now: float) -> bool:
        """The same frame id from the same source within ``dedup_s``: a QoS 1 redelivery (a
        camera's retry after a lost acknowledgement, or a broker restart), whose frame already
        has its result. Bounded in time and in size."""
        if frame_id is None or self.s.dedup_s <= 0:
            return False
        while self.recent and next(iter(self.recent.values())) < now - self.s.dedup_s:
            self.recent.popitem(last=False)
        key = (source, frame_id)
        if key in self.recent:
            return True
        self.recent[key] = now
        if len(self.recent) > DEDUP_MAX:
            self.recent.popitem(last=False)
        return False

    async def admit(self, source: str, task_id: str, frame: Frame) -> None:
        if self.duplicate(source, frame.frame_id, time.monotonic()):
            self.counts["duplicate_frames"] += 1
            self.m_drops.labels(reason="duplicate-frame").inc()
            return
        frame_id = frame.frame_id or f"{source}-{task_id}"
        now = time.time()
        info = self.registry.lookup(source)
        if info is None:
            await self.results.answer(task_id, source, frame_id, "error", created=now,
                                      error=f"unknown source {source!r} "
                                            "(OFFRAMP_SOURCES_UNKNOWN=reject)")
            return
        if not self.tracker.can_admit(source):
            self.m_drops.labels(reason="in-flight-bound").inc()
            await self.results.answer(task_id, source, frame_id, "dropped", created=now,
                                      error=f"{self.s.max_in_flight} frames of {source} in "
                                            "flight")
            return
        deadline = frame.deadline or (now + info.deadline_s if info.deadline_s else None) or \
            (now + self.s.deadline_s if self.s.deadline_s else None)
        task = Task(task_id, source, frame_id, frame.x, now, deadline, frame.label, info.priority)
        verdict = self.gate.offer(source, task, now)
        if verdict == "drop":
            self.m_drops.labels(reason="admitted-rate").inc()
            await self.results.answer(task_id, source, frame_id, "dropped", created=now,
                                      error="over the admitted rate")
            return
        self.tracker.add(task)
        if verdict == "admit":
            self.submit([task])

    # -- overflow and stop --------------------------------------------------------------------
    def on_overflow(self, msg: Message) -> None:
        """The ingest inbox was full and let ``msg`` go: it is answered ``dropped`` soon."""
        self.overflowed.append(msg)
        self._overflow.set()

    async def answer_overflow(self) -> None:
        while True:
            await self._overflow.wait()
            self._overflow.clear()
            drops, self.overflowed = self.overflowed, []
            self.m_drops.labels(reason="ingest-queue").inc(len(drops))
            await self.answer_unread(drops, "dropped", "ingest queue full")

    async def answer_unread(self, msgs: list[Message], status: Status, error: str) -> None:
        """Answer frames that were received but never decoded (they have no frame id yet)."""
        for msg in msgs:
            source = self._source(msg)
            if source is not None:
                task_id = self.new_id()
                await self.results.answer(task_id, source, f"{source}-{task_id}", status,
                                          error=error)

    async def stop(self, sub: Subscription[Message]) -> None:
        """Answer every frame received (and acknowledged to the broker) but not answered yet:
        ``dropped`` the ones the inbox let go, ``error`` the ones in hand or still in it."""
        unread, overflowed = [*self.in_hand, *sub.inbox.drain()], self.overflowed
        self.in_hand.clear()
        self.overflowed = []
        await self.answer_unread(overflowed, "dropped", "ingest queue full")
        await self.answer_unread(unread, "error", "admission-controller stopped")
        self.decoder.shutdown(wait=False, cancel_futures=True)
