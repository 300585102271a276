"""admission-controller: owns every frame from ingest to its one result.

Subscribes to ``ingest/+``; decodes and preprocesses each frame off the event loop; looks its
source up in the registry (priority, deadline; unknown sources per ``OFFRAMP_SOURCES_UNKNOWN``);
admits it by the strategy in force (:mod:`offramp.policy.admission`; beyond the per-source
in-flight bound, or above the admitted rate, the frame is answered ``dropped`` at once); sends
the first activation to a host of segment 1 within that host's credit, highest priority first
(:mod:`admission_controller.dispatch`); turns workers' completions into
exactly one JSON result per frame on ``results/{source}``; re-dispatches work whose worker died
or stalled, and answers ``expired`` at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

from admission_controller.dispatch import Dispatcher
from admission_controller.frames import Frame, decode_frames
from admission_controller.gate import Gate
from admission_controller.tracker import Task, Tracker
from offramp.bus.connection import Bus, Message, Subscription
from offramp.bus.outbox import Outbox
from offramp.bus.topics import Topics
from offramp.errors import OfframpError, TopicError, WireError
from offramp.model.bundle import Bundle, load_bundle
from offramp.model.inputs import FrameError
from offramp.node.allocator import return_large_blocks
from offramp.node.entry import ServiceSpec
from offramp.node.metrics import LATENCY_BUCKETS, Reading
from offramp.node.runtime import Runtime
from offramp.node.sources import SourceRegistry, SourceSettings
from offramp.policy.admission import ControlSettings
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import Completion, DoneReport, Heartbeat, Plan, Result, Status

PREFIX = "OFFRAMP_ADMISSION_"
DECODE_BATCH = 32


@dataclass(frozen=True)
class AdmissionSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    sources: SourceSettings = nested(SourceSettings, "OFFRAMP_SOURCES_")
    control: ControlSettings = nested(ControlSettings, "OFFRAMP_CONTROL_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    max_in_flight: int = setting(256, "Frames in flight per source; beyond it: 'dropped'",
                                 min=1, max=1_000_000)
    ingest_queue: int = setting(2048, "Bound of the ingest inbox; overflow: 'dropped'", min=1,
                                max=1_000_000)
    progress_timeout_s: float = setting(5.0, "Dispatch again when no result after this long "
                                        "(plus twice the backlog along the path)",
                                        min=0.05, max=3600)
    max_attempts: int = setting(3, "Dispatches per frame before it is answered 'error'", min=1,
                                max=100)
    deadline_s: float = setting(0.0, "Default deadline per frame after arrival (0: none)", min=0,
                                max=86400)
    dispatch_batch: int = setting(8, "Frames per first-activation packet", min=1, max=1024)
    dispatch_wait_ms: float = setting(1.0, "Longest wait to fill a packet", min=0, max=1000)
    codec: Literal["raw", "fp16"] = setting("raw", "Codec of the input tensor")
    results_in_flight: int = setting(256, "Results being published at once (QoS 1)", min=1,
                                     max=100_000)
    max_pixels: int = setting(0, "Largest image accepted, in pixels, read from its header "
                              "before any decoding (0: 4K UHD, or 4x the model input if larger)",
                              min=0, max=1 << 28)
    dedup_s: float = setting(10.0, "A frame id seen again from the same source within this "
                             "long is a redelivery and gets no second result (0: off)", min=0,
                             max=3600)




class Admission:
    def __init__(self, settings: AdmissionSettings, bundle: Bundle, runtime: Runtime) -> None:
        self.s = settings
        self.bundle = bundle
        self.rt = runtime
        self.bus: Bus = runtime.bus
        self.topics: Topics = runtime.topics
        self.registry = SourceRegistry(settings.sources)
        self.gate: Gate[Task] = Gate(settings.control)
        self.tracker = Tracker(settings.max_in_flight, settings.progress_timeout_s,
                               settings.max_attempts)
        self.dispatcher = Dispatcher(self, runtime)
        self.unanswered_drops: list[Message] = []
        self.in_hand: deque[Message] = deque()  # taken from the ingest inbox, not yet answered
        self.stopping = threading.Event()  # tells the decode thread to leave the rest
        self.counts: Counter[str] = Counter()
        self.recent: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Task ids name this incarnation: a successor after a crash never reuses one, so a
        # client deduplicating by task id keeps every result, and a late completion from the
        # predecessor's work completes nothing here.
        self.id_prefix = f"{runtime.node}-{secrets.token_hex(4)}-"
        self.ids = itertools.count()
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.outbox = Outbox(settings.results_in_flight)
        self.max_bytes = settings.common.bus.max_message_bytes
        m = runtime.metrics
        self.m_frames = m.counter("offramp_frames_total", "Frames received at ingest, by source",
                                  ["source"])
        self.m_results = m.counter("offramp_results_total", "Results published, by source and "
                                   "status", ["source", "status"])
        self.m_exits = m.counter("offramp_exits_total", "Frames answered at each exit", ["exit"])
        self.m_latency = m.histogram("offramp_latency_seconds", "Ingest to result of 'ok' "
                                     "frames, by source", LATENCY_BUCKETS, ["source"])
        self.m_drops = m.counter("offramp_drops_total", "Frames answered 'dropped', by reason",
                                 ["reason"])
        m.on_collect(self._read)
        runtime.require(lambda: None if self.dispatcher.peers.nodes("worker")
                        else "no segment-worker seen yet")

    def _read(self, r: Reading) -> None:
        r.gauge("offramp_in_flight", "Frames owned and not yet answered", len(self.tracker))
        r.gauge("offramp_pending", "Frames waiting for a worker's credit",
                self.dispatcher.waiting())
        for key, value in self.gate.stats().items():
            if key.startswith("admitted_rate:"):
                r.gauge("offramp_admitted_rate", "Admitted frames/s per source (strategy rate)",
                        value, source=key.split(":", 1)[1])

    # -- results ----------------------------------------------------------------------------------
    async def answer(self, task_id: str, source: str, frame_id: str, status: Status, *,
                     error: str | None = None, done: Completion | None = None,
                     created: float | None = None) -> None:
        now = time.time()
        result = Result(task_id=task_id, source=source, frame_id=frame_id, status=status, error=error, ts=now)
        if done is not None:
            queue = sum(h.started - h.arrived for h in done.hops)
            compute = sum(h.finished - h.started for h in done.hops)
            total = now - done.created
            result = replace(result, label=done.label,
                             class_name=self.bundle.manifest.classes[done.label]
                             if 0 <= done.label < len(self.bundle.manifest.classes) else None,
                             confidence=round(done.confidence, 6), exit_index=done.exit_index,
                             reason=done.reason, nodes=[h.node for h in done.hops],
                             thresholds=list(done.thresholds),
                             latency_ms={"total": round(1000 * total, 3),
                                         "queue": round(1000 * queue, 3),
                                         "compute": round(1000 * compute, 3),
                                         "transfer": round(1000 * max(0.0, total - queue - compute), 3)})
        elif created is not None:
            result = replace(result, latency_ms={"total": round(1000 * (now - created), 3)})
        self.counts[status] += 1
        self.m_results.labels(source=source, status=status).inc()
        if done is not None:
            self.m_exits.labels(exit=done.exit_index).inc()
            self.m_latency.labels(source=source).observe(now - done.created)
        await self.outbox.send(self._publish_result(task_id, source, result.to_json()))

    async def _publish_result(self, task_id: str, source: str, payload: bytes) -> None:
        try:
            await self.bus.publish(self.topics.results(source), payload, qos=1)
        except OfframpError as exc:
            self.rt.log.error("result_not_published", task_id=task_id, error=str(exc))

    # -- ingest -----------------------------------------------------------------------------------
    def new_id(self) -> str:
        return f"{self.id_prefix}{next(self.ids)}"

    async def ingest(self, sub: Subscription) -> None:
        """Frames are decoded off the event loop, up to DECODE_BATCH per hand-off to the decode
        thread: a hand-off per frame cost more than decoding a small frame does."""
        loop = asyncio.get_running_loop()
        decode = partial(decode_frames, spec=self.bundle.manifest.input, max_bytes=self.max_bytes,
                         max_pixels=self.s.max_pixels, stop=self.stopping)
        while True:
            self.in_hand.append(await sub.get())
            while len(self.in_hand) < DECODE_BATCH and (more := sub.inbox.get_nowait()):
                self.in_hand.append(more)
            frames = await loop.run_in_executor(self.decoder, decode,
                                                [m.payload for m in self.in_hand])
            for frame in frames:
                msg = self.in_hand[0]
                try:
                    source = self.topics.parse(msg.topic).source
                except TopicError:
                    self.in_hand.popleft()
                    continue
                self.counts["frames"] += 1
                self.m_frames.labels(source=source).inc()
                task_id = self.new_id()
                if isinstance(frame, FrameError):
                    await self.answer(task_id, source, f"{source}-{task_id}", "error",
                                      error=str(frame))
                else:
                    await self.admit(source, task_id, frame)
                self.in_hand.popleft()  # only now: a stop meanwhile answers it (unanswered)

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
        if len(self.recent) > 1_000_000:
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
            await self.answer(task_id, source, frame_id, "error", created=now,
                              error=f"unknown source {source!r} (OFFRAMP_SOURCES_UNKNOWN=reject)")
            return
        if not self.tracker.can_admit(source):
            self.m_drops.labels(reason="in-flight-bound").inc()
            await self.answer(task_id, source, frame_id, "dropped", created=now,
                              error=f"{self.s.max_in_flight} frames of {source} in flight")
            return
        deadline = frame.deadline or (now + info.deadline_s if info.deadline_s else None) or \
            (now + self.s.deadline_s if self.s.deadline_s else None)
        task = Task(task_id, source, frame_id, frame.x, now, deadline, frame.label, info.priority)
        verdict = self.gate.offer(source, task, now)
        if verdict == "drop":
            self.m_drops.labels(reason="admitted-rate").inc()
            await self.answer(task_id, source, frame_id, "dropped", created=now,
                              error="over the admitted rate")
            return
        self.tracker.add(task)
        if verdict == "admit":
            self.dispatcher.submit([task])

    def on_ingest_overflow(self, msg: Message) -> None:
        self.unanswered_drops.append(msg)
        self.dispatcher.wake()

    async def answer_overflow(self) -> None:
        drops, self.unanswered_drops = self.unanswered_drops, []
        self.m_drops.labels(reason="ingest-queue").inc(len(drops))
        await self.answer_unread(drops, "dropped", "ingest queue full")

    async def answer_unread(self, msgs: list[Message], status: Status, error: str) -> None:
        """Answer frames that were received but never decoded (they have no frame id yet)."""
        for msg in msgs:
            with contextlib.suppress(TopicError):
                source = self.topics.parse(msg.topic).source
                task_id = self.new_id()
                await self.answer(task_id, source, f"{source}-{task_id}", status, error=error)

    # -- completions, liveness, deadlines, control ---------------------------------------------
    async def completions(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                report = DoneReport.decode(msg.payload, max_bytes=self.max_bytes)
            except WireError as exc:
                self.counts["bad_completions"] += 1
                self.rt.log.warning("bad_completion", error=str(exc))
                continue
            for done in report.completions:
                task = self.tracker.complete(done.task_id)
                if task is not None:
                    await self.answer(task.task_id, task.source, task.frame_id, "ok", done=done)
                elif not done.task_id.startswith(self.id_prefix):
                    self.counts["stale_completions"] += 1  # an earlier incarnation's task

    async def states(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                hb = Heartbeat.decode(msg.payload)
            except WireError:
                continue
            if self.dispatcher.peers.update(hb):
                self.dispatcher.window.forget(hb.node)
                lost = self.tracker.lost(hb.node)
                if lost:
                    self.rt.log.warning("worker_lost", worker=hb.node, redispatch=len(lost))
                    self.counts["redispatched"] += len(lost)
                    self.dispatcher.submit(lost)
            self.dispatcher.wake()

    async def registrations(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                source = self.topics.parse(msg.topic).source
                spec = self.registry.update(source, msg.payload)
            except (TopicError, WireError) as exc:
                self.counts["bad_registrations"] += 1
                self.rt.log.warning("bad_source_registration", topic=msg.topic, error=str(exc))
                continue
            self.rt.log.info("source_registered", source=source,
                             priority=spec.priority if spec else None)

    async def plans(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                self.dispatcher.plan = Plan.decode(msg.payload)
            except WireError as exc:
                self.rt.log.warning("bad_plan", error=str(exc))

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            sweep = self.tracker.sweep(time.time(), self.dispatcher.path_backlog(0.0))
            for t in sweep.expired:
                await self.answer(t.task_id, t.source, t.frame_id, "expired", created=t.created,
                                  error="deadline passed")
            for t in sweep.failed:
                await self.answer(t.task_id, t.source, t.frame_id, "error", created=t.created,
                                  error=f"no result after {t.attempt} dispatches")
            if sweep.redispatch:
                self.counts["redispatched"] += len(sweep.redispatch)
                self.dispatcher.submit(sweep.redispatch)

    async def control(self) -> None:
        """The rate strategy's loop: adapt admitted rates, let waiting frames through."""
        tick = self.s.control.tick_s
        next_tick = time.monotonic()
        while True:
            await asyncio.sleep(0.005 if self.s.control.buffer else tick)
            if time.monotonic() >= next_tick:
                next_tick += tick
                self.gate.tick({src: self.dispatcher.path_backlog(self._priority(src))
                                for src in self.gate.sources()})
            released = [t for _, t in self.gate.release(time.time()) if t.task_id in self.tracker]
            if released:
                self.dispatcher.submit(released)

    def _priority(self, source: str) -> float:
        info = self.registry.lookup(source)
        return info.priority if info else self.s.sources.default_priority

    def heartbeat(self, hb: Heartbeat) -> Heartbeat:
        stats = {k: float(v) for k, v in self.counts.items()}
        stats["in_flight"] = float(len(self.tracker))
        stats["duplicates"] = float(self.tracker.duplicates)
        stats["pending"] = float(self.dispatcher.waiting())
        stats.update(self.gate.stats())
        return self.dispatcher.heartbeat(replace(hb, stats=stats))


async def run(settings: AdmissionSettings, stop: asyncio.Event) -> None:
    bundle = load_bundle(settings.bundle)
    return_large_blocks()  # decoded frames' buffers go back to the OS when freed
    holder: dict[str, Admission] = {}
    runtime = Runtime("admission", settings.common,
                      heartbeat=lambda hb: holder["a"].heartbeat(hb) if "a" in holder else hb)
    async with runtime:
        adm = Admission(settings, bundle, runtime)
        holder["a"] = adm
        bus, topics = runtime.bus, runtime.topics
        done = await bus.subscribe(topics.done_all(), qos=1, maxsize=65536)
        states = await bus.subscribe(topics.state_all("worker"), maxsize=1024)
        sources = await bus.subscribe(topics.source_all(), qos=1, maxsize=1024)
        plans = await bus.subscribe(topics.plan(), maxsize=8, overflow="drop-oldest")
        ingest = await bus.subscribe(topics.ingest_all(), qos=1, maxsize=settings.ingest_queue,
                                     overflow="drop-newest", on_drop=adm.on_ingest_overflow)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in (
                adm.ingest(ingest), adm.dispatcher.run(), adm.completions(done),
                adm.states(states), adm.registrations(sources), adm.plans(plans),
                adm.sweeper(), adm.control())]
            await stop.wait()
            adm.stopping.set()
            for t in tasks:
                t.cancel()
        for task in adm.tracker.drain():
            await adm.answer(task.task_id, task.source, task.frame_id, "error",
                             created=task.created, error="admission-controller stopped")
        # Received (and acknowledged to the broker) but not decoded yet: answered too.
        await adm.answer_unread([*adm.in_hand, *ingest.inbox.drain()], "error",
                                "admission-controller stopped")
        await adm.outbox.flush(5.0)
        adm.decoder.shutdown(wait=False, cancel_futures=True)


SERVICE = ServiceSpec(name="admission-controller", module="admission_controller", settings=AdmissionSettings,
                      prefix=PREFIX, run=run)
