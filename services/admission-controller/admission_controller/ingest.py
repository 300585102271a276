"""From ``ingest/+`` to admitted tasks, admission decided before any pixel is decoded.

Each frame is first read cheaply on the event loop (:func:`~admission_controller.frames.
read_frame`: its kind, and an envelope's frame id, deadline and label; a raw image's frame id
may come as MQTT v5 correlation data). A redelivered frame is recognised; a frame over its
source's in-flight bound or above its admitted rate is refused (``dropped``) without decoding
it, listed by its own frame id in its source's next refusal
(:mod:`admission_controller.refusals`). Only admitted frames go further: by default their
header is checked on the event loop (bounded work, no pixel decoded) and the bytes go to the
first worker as they came; with ``OFFRAMP_ADMISSION_FIRST_HOP=tensor`` they are decoded and
preprocessed here, off the event loop, a batch per hand-off. One that fails is answered
``error``.

Frames come on a connection of their own with manual acknowledgement: a frame is
acknowledged to the broker only once it is answered (:mod:`admission_controller.results`),
and the broker is asked to send at most ``OFFRAMP_ADMISSION_INGEST_WINDOW`` unacknowledged
frames. Mosquitto 2.0 keeps to that only while acknowledgements come in order; once refused
frames are acknowledged ahead of admitted ones it sends more, and what the inbox cannot hold
is refused too ("ingest queue full").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from admission_controller.frames import Arrival, BadEnvelope, read_frame, to_forwards, to_inputs
from admission_controller.gate import Gate
from admission_controller.refusals import Refusals
from admission_controller.results import INVALID, UNTRACKED, Owed, Results
from admission_controller.settings import AdmissionSettings
from admission_controller.sources import SourceTable
from admission_controller.tracker import Task, Tracker
from offramp.bus import Message, Subscription, Topics
from offramp.bus.inbox import RateLimitedWarning
from offramp.errors import TopicError
from offramp.model.inputs import FrameError, InputSpec
from offramp.node.sources import SourceRegistry
from offramp.node.telemetry import Telemetry
from offramp.wire import Status

DECODE_BATCH = 32  # frames per hand-off to the decode thread
DECODES_IN_FLIGHT = 2  # batches with the decode thread at once
DEDUP_MAX = 1_000_000  # (source, frame id) pairs remembered at most


def correlated_id(msg: Message) -> str | None:
    """A frame id from MQTT v5 correlation data: its text when it is printable UTF-8 of at
    most 256 characters, else its hex."""
    data = msg.correlation_data
    if not data:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data.hex()
    return text if text.isprintable() and len(text) <= 256 else data.hex()


@dataclass(frozen=True)
class Books:
    """What the admission-controller keeps of sources and frames, which intake writes each
    frame it takes into, and how it names them."""

    registry: SourceRegistry  # declared sources and their priorities
    sources: SourceTable  # the sources tracked (bounded)
    gate: Gate[Task]  # each source's admitted rate
    tracker: Tracker  # frames owned until answered
    new_id: Callable[[], str]  # a task id of this incarnation


@dataclass(frozen=True)
class Replies:
    """The two ways a frame is answered: its own result, or its id in a source's refusal."""

    results: Results
    refusals: Refusals


class Ingest:
    def __init__(self, settings: AdmissionSettings, spec: InputSpec, *, books: Books,
                 replies: Replies, topics: Topics, submit: Callable[[list[Task]], None],
                 telemetry: Telemetry) -> None:
        self.s = settings
        self.spec = spec
        self.topics = topics
        self.registry = books.registry
        self.tracker = books.tracker
        self.gate = books.gate
        self.sources = books.sources
        self.new_id = books.new_id
        self.submit = submit
        self.results = replies.results
        self.refusals = replies.refusals
        self.tracing = telemetry.tracing
        self.log = telemetry.log
        metrics = telemetry.metrics
        self.counts = self.results.counts
        self.in_hand: deque[Message] = deque()  # taken from the inbox, not yet answered
        self.stopping = threading.Event()  # tells the decode thread to leave the rest
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.decoding: set[str] = set()  # admitted tasks whose frame is not decoded yet
        self.released: set[str] = set()  # ... of which the gate has already let go
        self.overflowed: list[Message] = []
        self._overflow = asyncio.Event()
        self._bad_source = RateLimitedWarning()
        self._source_limit = RateLimitedWarning()
        self.m_frames = metrics.counter("offramp_frames_total", "Frames received at ingest, by "
                                        "source", ["source"])
        self.m_drops = metrics.counter("offramp_drops_total", "Frames answered 'dropped' (or "
                                       "not answerable), by reason", ["reason"])

    # -- the ingest loop ----------------------------------------------------------------------
    async def run(self, sub: Subscription[Message]) -> None:
        """Take frames as they come and decide each; the admitted ones of a batch are decoded
        while the next batches are decided (up to DECODES_IN_FLIGHT batches with the decode
        thread), so that a frame is refused as soon as it is read, not after the pixels of
        the frames before it were decoded."""
        slots = asyncio.Semaphore(DECODES_IN_FLIGHT)
        async with asyncio.TaskGroup() as decoding:
            while True:
                self.in_hand.append(await sub.get())
                while len(self.in_hand) < DECODE_BATCH and (more := sub.get_nowait()):
                    self.in_hand.append(more)
                admitted: list[tuple[Task, Arrival]] = []
                while self.in_hand:
                    msg = self.in_hand[0]
                    pair = await self._admit(msg)
                    if pair is not None:
                        admitted.append(pair)
                    self.in_hand.popleft()  # only now: a stop meanwhile answers it
                if admitted:
                    await slots.acquire()
                    decoding.create_task(self._decode(admitted, slots))

    async def _decode(self, admitted: list[tuple[Task, Arrival]],
                      slot: asyncio.Semaphore) -> None:
        try:
            started = time.time()
            arrivals = [a for _, a in admitted]
            if self.s.first_hop == "frames":
                # header checks only, a few microseconds each in bounded work (model.headers):
                # cheaper here than the hand-off to the decode thread and back
                inputs: list[Any] = to_forwards(arrivals, spec=self.spec,
                                                max_pixels=self.s.common.max_pixels)
            else:
                inputs = await asyncio.get_running_loop().run_in_executor(
                    self.decoder, partial(to_inputs, spec=self.spec,
                                          max_pixels=self.s.common.max_pixels,
                                          stop=self.stopping), arrivals)
            self._trace_decode([t for t, _ in admitted], started, time.time())
            for (task, _), x in zip(admitted, inputs, strict=False):
                await self._decoded(task, x)
        finally:
            slot.release()

    def _trace_decode(self, tasks: list[Task], started: float, finished: float) -> None:
        if self.tracing is None or not self.tracing.enabled:
            return
        for task in tasks:
            self.tracing.record(task.trace, "decode", started, finished,
                                {"offramp.batch": len(tasks)})

    async def _admit(self, msg: Message) -> tuple[Task, Arrival] | None:
        """Decide one frame from its cheap reading: a task to decode, or None (answered)."""
        source = self._source(msg)
        task_id = self.new_id()
        if source is None:
            if msg.response_topic is not None:  # it can still be answered there
                raw = self._raw_source(msg)
                await self.results.answer(Owed(task_id, raw, self._frame_id(
                    msg, None, msg.topic, task_id), origin=msg), "error",
                    error="invalid source name", label=INVALID)
            else:
                self.results.acknowledge(msg)
            return None
        if not await self._tracked(msg, source, task_id):
            return None
        self.counts["frames"] += 1
        self.m_frames.labels(source=source).inc()
        now = time.time()
        try:
            arrival = read_frame(msg.payload, max_bytes=self.s.common.bus.max_message_bytes)
        except FrameError as exc:  # a broken envelope is answered under the id it names
            named = exc.frame_id if isinstance(exc, BadEnvelope) else None
            await self.results.answer(Owed(task_id, source, self._frame_id(
                msg, named, source, task_id), now, msg), "error", error=str(exc))
            return None
        frame_id = self._frame_id(msg, arrival.frame_id, source, task_id)
        if self.duplicate(source, frame_id if arrival.frame_id or msg.correlation_data
                          else None, time.monotonic()):
            await self._again(source, frame_id, msg)
            return None
        info = self.registry.lookup(source)
        if info is None:
            await self.results.answer(Owed(task_id, source, frame_id, now, msg), "error",
                                      error=f"unknown source {source!r} "
                                            "(OFFRAMP_SOURCES_UNKNOWN=reject)")
            return None
        if not self.tracker.can_admit(source):
            self.m_drops.labels(reason="in-flight-bound").inc()
            self.refusals.add(source, frame_id, f"{self.s.max_in_flight} frames of the source in "
                              "flight", msg)
            return None
        deadline = arrival.deadline or (now + info.deadline_s if info.deadline_s else None) or \
            (now + self.s.deadline_s if self.s.deadline_s else None)
        task = Task(task_id, source, frame_id, None, now, deadline, arrival.label,
                    info.priority, origin=msg)
        verdict = self.gate.offer(source, task, now)
        if verdict == "drop":
            self.m_drops.labels(reason="admitted-rate").inc()
            self.refusals.add(source, frame_id, "over the admitted rate", msg)
            return None
        self.tracker.add(task)
        if self.tracing is not None and (span := self.tracing.start_frame(now, {
                "offramp.source": source, "offramp.frame_id": frame_id,
                "offramp.task_id": task_id, "offramp.priority": info.priority})) is not None:
            task.trace, task.traceparent = span, self.tracing.traceparent(span)
        self.decoding.add(task_id)
        if verdict == "admit":
            self.released.add(task_id)
        return task, arrival

    async def _tracked(self, msg: Message, source: str, task_id: str) -> bool:
        """Whether the source has a place in the bounded source table (one idle long enough
        gives its place up, and its state is forgotten); a frame of a source without one is
        answered ``error`` at once."""
        tracked = self.sources.track(source, time.monotonic(), self._busy)
        if tracked.evicted is not None:
            self.gate.forget(tracked.evicted)
            self.results.forget(tracked.evicted)
            with contextlib.suppress(KeyError):
                self.m_frames.remove(tracked.evicted)
        if tracked.tracked:
            return True
        self.m_drops.labels(reason="source-limit").inc()  # the table counts it for the heartbeat
        if n := self._source_limit.should_log():
            self.log.warning("source_limit", source=source[:128], tracked=len(self.sources),
                             count=n)
        frame_id = self._frame_id(msg, self._claimed_id(msg), source, task_id)
        await self.results.answer(
            Owed(task_id, source, frame_id, time.time(), msg), "error",
            error=f"{len(self.sources)} sources are active, the most this "
            "admission-controller tracks (OFFRAMP_ADMISSION_MAX_SOURCES); a source idle for "
            "OFFRAMP_ADMISSION_SOURCE_IDLE_S gives its place up", label=UNTRACKED)
        return False

    def _busy(self, source: str) -> bool:
        return self.tracker.in_flight(source) > 0 or self.gate.waiting(source) > 0

    def _claimed_id(self, msg: Message) -> str | None:
        """The frame id an envelope names, read cheaply (no pixel), for an early answer."""
        try:
            return read_frame(msg.payload, max_bytes=self.s.common.bus.max_message_bytes).frame_id
        except BadEnvelope as exc:
            return exc.frame_id
        except FrameError:
            return None

    async def _decoded(self, task: Task, x: object) -> None:
        self.decoding.discard(task.task_id)
        released = task.task_id in self.released
        self.released.discard(task.task_id)
        if task.task_id not in self.tracker:
            return  # answered meanwhile (its deadline passed)
        if isinstance(x, FrameError):
            self.tracker.complete(task.task_id)
            await self.results.answer(task.owed(), "error", error=str(x))
            return
        assert isinstance(x, np.ndarray | bytes)
        task.x = x
        if released:
            self.submit([task])

    def release(self, tasks: list[Task]) -> None:
        """The gate let these waiting tasks go: dispatch the decoded ones now, the others as
        soon as they are decoded."""
        ready = []
        for task in tasks:
            if task.task_id in self.decoding:
                self.released.add(task.task_id)
            elif task.task_id in self.tracker:
                ready.append(task)
        if ready:
            self.submit(ready)

    # -- names and ids ------------------------------------------------------------------------
    def _source(self, msg: Message) -> str | None:
        """The source of an ingest topic; None (logged, counted) for a name no results topic
        can be made of."""
        try:
            return self.topics.parse(msg.topic).source
        except TopicError as exc:
            self.counts["invalid_sources"] += 1
            self.m_drops.labels(reason="invalid-source").inc()
            if n := self._bad_source.should_log():
                self.log.warning("invalid_source", topic=msg.topic[:300], error=str(exc), count=n,
                                 answered=msg.response_topic is not None)
            return None

    def _raw_source(self, msg: Message) -> str:
        """What follows ``ingest/`` in a topic that names no valid source (for its answer)."""
        return msg.topic.rsplit("/ingest/", 1)[-1][:300]

    @staticmethod
    def _frame_id(msg: Message, given: str | None, source: str, task_id: str) -> str:
        """The frame's own id (its envelope's, or its correlation data), else one made up."""
        return given or correlated_id(msg) or f"{source}-{task_id}"

    def duplicate(self, source: str, frame_id: str | None, now: float) -> bool:
        """The same frame id from the same source within ``dedup_s``: a QoS 1 redelivery (a
        camera's retry after a lost acknowledgement, a broker restart, or a frame another
        member of the group answered and died before acknowledging), whose frame already has
        its answer. Bounded in time and in size."""
        if frame_id is None or self.s.dedup_s <= 0:
            return False
        self._forget_older(now)
        if (source, frame_id) in self.recent:
            return True
        self._note(source, frame_id, now)
        return False

    async def _again(self, source: str, frame_id: str, msg: Message) -> None:
        """A frame seen before: if it was answered, that answer again (a camera sends a frame
        again when it got none: a broker crash lost the frame or its answer); if it is still
        in flight, nothing (its one answer comes when it is done)."""
        self.counts["duplicate_frames"] += 1
        self.m_drops.labels(reason="duplicate-frame").inc()
        told = self.results.told(source, frame_id)
        if told is not None and told.result is not None:
            await self.results.again(source, frame_id, told.result, msg)
        elif told is not None and told.refused is not None:
            self.results.answered_again()
            self.refusals.add(source, frame_id, told.refused, msg, again=True)
        else:
            self.results.acknowledge(msg)

    def remember(self, source: str, frame_id: str, now: float) -> None:
        """A frame answered: one that comes again within ``dedup_s`` is a duplicate."""
        if self.s.dedup_s > 0:
            self._forget_older(now)
            self._note(source, frame_id, now)

    def _note(self, source: str, frame_id: str, now: float) -> None:
        self.recent[(source, frame_id)] = now
        self.recent.move_to_end((source, frame_id))  # the oldest stay first
        if len(self.recent) > DEDUP_MAX:
            self.recent.popitem(last=False)

    def _forget_older(self, now: float) -> None:
        while self.recent and next(iter(self.recent.values())) < now - self.s.dedup_s:
            self.recent.popitem(last=False)

    # -- overflow and stop --------------------------------------------------------------------
    def on_overflow(self, msg: Message) -> None:
        """The ingest inbox was full and let ``msg`` go (QoS 0 frames are not bounded by the
        ingest window): it is answered ``dropped`` soon, under its own frame id."""
        self.overflowed.append(msg)
        self._overflow.set()

    async def answer_overflow(self) -> None:
        while True:
            await self._overflow.wait()
            self._overflow.clear()
            drops, self.overflowed = self.overflowed, []
            self.m_drops.labels(reason="ingest-queue").inc(len(drops))
            self.refuse_unread(drops, "ingest queue full")

    def refuse_unread(self, msgs: list[Message], reason: str) -> None:
        """Refuse frames that were received but not read, under their own frame ids; a frame
        seen before (a redelivery) is acknowledged without a second answer."""
        now = time.monotonic()
        for msg in msgs:
            source = self._source(msg)
            if source is None:
                self.results.acknowledge(msg)
                continue
            own = self._own_id(msg)
            if self.duplicate(source, own, now):
                self.counts["duplicate_frames"] += 1
                self.m_drops.labels(reason="duplicate-frame").inc()
                self.results.acknowledge(msg)
                continue
            self.refusals.add(source, own or f"{source}-{self.new_id()}", reason, msg)

    async def answer_unread(self, msgs: list[Message], status: Status, error: str) -> None:
        """Answer frames that were received but not admitted, one result each."""
        for msg in msgs:
            source = self._source(msg)
            if source is None:
                self.results.acknowledge(msg)
                continue
            task_id = self.new_id()
            await self.results.answer(Owed(task_id, source, self._given_id(
                msg, source, task_id), origin=msg), status, error=error)

    def _given_id(self, msg: Message, source: str, task_id: str) -> str:
        """An unread frame's own id, else one made up from ``task_id``."""
        return self._own_id(msg) or f"{source}-{task_id}"

    def _own_id(self, msg: Message) -> str | None:
        """An unread frame's own id, as :meth:`_frame_id` takes it: its envelope's, else its
        correlation data."""
        try:
            given = read_frame(msg.payload, max_bytes=self.s.common.bus.max_message_bytes
                               ).frame_id
        except FrameError:
            given = None
        return given or correlated_id(msg)

    def forget(self) -> None:
        """Drop what is in hand, unanswered: another member holds the session now, and the
        broker hands these frames to it."""
        self.in_hand.clear()
        self.overflowed = []
        self.decoding.clear()
        self.released.clear()
        self.refusals.forget()

    async def stop(self, sub: Subscription[Message]) -> None:
        """Answer every frame received but not answered yet: ``dropped`` the ones the inbox
        let go, ``error`` the ones in hand or still in it."""
        unread, overflowed = [*self.in_hand, *sub.inbox.drain()], self.overflowed
        self.in_hand.clear()
        self.overflowed = []
        self.refuse_unread(overflowed, "ingest queue full")
        await self.refusals.flush()
        await self.answer_unread(unread, "error", "admission-controller stopped")
        self.decoder.shutdown(wait=False, cancel_futures=True)
