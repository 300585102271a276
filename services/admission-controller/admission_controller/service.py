"""admission-controller: owns every frame from ingest to its one result.

Subscribes to ``ingest/+``; decodes and preprocesses each frame off the event loop
(:mod:`admission_controller.ingest`); looks its source up in the registry (priority, deadline;
unknown sources per ``OFFRAMP_SOURCES_UNKNOWN``); admits it by the strategy in force
(:mod:`offramp.policy.admission`; beyond the per-source in-flight bound, or above the admitted
rate, the frame is answered ``dropped`` at once); sends the first activation to a host of
segment 1 within that host's credit, highest priority first
(:mod:`admission_controller.dispatch`); turns workers' completions into exactly one JSON result
per frame on ``results/{source}`` (:mod:`admission_controller.results`); re-dispatches work
whose worker died or stalled, and answers ``expired`` at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from admission_controller.answers import Answers
from admission_controller.dispatch import DispatchConfig, Dispatcher
from admission_controller.gate import Gate
from admission_controller.ingest import Books, Ingest, Replies
from admission_controller.leadership import Leadership
from admission_controller.pacing import Pacing
from admission_controller.refusals import Refusals
from admission_controller.results import UNTRACKED, Delivery, Results
from admission_controller.session import IngestSession
from admission_controller.settings import PREFIX, AdmissionSettings
from admission_controller.sources import SourceTable
from admission_controller.tracker import Task, Tracker
from offramp.bus import Bus, Message, MessageBus, Subscription, from_payload
from offramp.errors import WireError
from offramp.model.bundle import Bundle, load_bundle
from offramp.model.images import refuse_by_budget_only
from offramp.node.allocator import return_large_blocks
from offramp.node.broker_figures import SYS_TOPICS, BrokerFigures
from offramp.node.entry import ServiceSpec
from offramp.node.metrics import Reading
from offramp.node.runtime import BusFactory, Runtime
from offramp.node.sources import Registration, SourceRegistry, registration
from offramp.policy.bundles import unserved
from offramp.policy.pace import PaceConfig, Pacer
from offramp.wire import DoneReport, Heartbeat, Plan, read_results

SWEEP_S = 0.05  # how often frames in flight are looked at (deadlines, silent workers)
IDLE_SWEEP_S = 1.0  # ... and how often when none is
WATCH_TICK_S = 0.05  # how soon a change of leadership is seen by the watch of others' answers


class Admission:
    """The admission-controller's state and the loops that keep it: completions, worker
    liveness, source registrations, plans, deadlines and the rate strategy."""

    def __init__(self, settings: AdmissionSettings, bundle: Bundle, runtime: Runtime,
                 make_ingest_bus: Callable[[], MessageBus]) -> None:
        self.s = settings
        self.bundle = bundle
        self.rt = runtime
        self.registry = SourceRegistry(settings.sources)
        self.gate: Gate[Task] = Gate(settings.control)
        self.tracker = Tracker(settings.max_in_flight, settings.progress_timeout_s,
                               settings.max_attempts)
        # Task ids name this incarnation: a successor after a crash never reuses one, so a
        # client deduplicating by task id keeps every result, and a late completion from the
        # predecessor's work completes nothing here.
        self.id_prefix = f"{runtime.node}-{secrets.token_hex(4)}-"
        self.ids = itertools.count()
        bus, topics = runtime.bus, runtime.topics
        model = bundle.name

        async def send(node: str, packet: bytes) -> None:
            await bus.publish(topics.act(model, 1, node), packet, qos=0)

        async def publish_result(topic: str, payload: bytes, correlation: bytes | None) -> None:
            await bus.publish(topic, payload, qos=1, correlation_data=correlation)

        self.dispatcher = Dispatcher(
            DispatchConfig(model=model, segments=bundle.num_segments, node=runtime.node,
                           batch=settings.dispatch_batch, wait_s=settings.dispatch_wait_ms / 1000,
                           codec=settings.codec, heartbeat_s=settings.common.heartbeat_s,
                           bundle=runtime.bundle),
            tracker=self.tracker, send=send, nudge=runtime.beat_soon, log=runtime.log,
            tracing=runtime.tracing,
            max_payload=lambda node: bus.max_payload(topics.act(model, 1, node)),
            refuse=self._refuse)
        self.answers = Answers(settings.dedup_s, settings.answers_kept)
        # the ingest session, made below, acknowledges each frame once its answer is out
        delivery = Delivery(publish_result, lambda msg: self.session.ack(msg))  # noqa: PLW0108
        self.results = Results(classes=bundle.manifest.classes, topics=topics,
                               delivery=delivery, metrics=runtime.metrics, log=runtime.log,
                               in_flight=settings.results_in_flight, tracing=runtime.tracing,
                               answers=self.answers)
        self.counts = self.results.counts
        self.sources = SourceTable(settings.max_sources, settings.source_idle_s)

        async def publish_refusal(topic: str, payload: bytes) -> None:
            await bus.publish(topic, payload, qos=1)

        self.refusals = Refusals(
            topics=topics, publish=publish_refusal,
            acknowledge=lambda msg: self.session.ack(msg),  # noqa: PLW0108 - the session is made below
            count=lambda source, n: self.results.counted(
                source if source in self.sources else UNTRACKED, "dropped", n),
            log=runtime.log, interval_s=settings.refusal_interval_ms / 1000,
            max_pending=settings.refusals_pending, answers=self.answers)
        replies = Replies(self.results, self.refusals)
        self.ingest = Ingest(settings, bundle.manifest.input,
                             books=Books(self.registry, self.sources, self.gate, self.tracker,
                                         self.new_id),
                             replies=replies, topics=topics, submit=self.dispatcher.submit,
                             telemetry=runtime.telemetry)
        hb = settings.common.heartbeat_s
        # A primary waits one heartbeat period: the group's retained heartbeats, which say
        # whether another member is active, arrive as soon as it subscribes.
        self.leadership = Leadership(runtime.node, stale_s=3 * hb, started=time.monotonic(),
                                     wait_s=settings.takeover_s if settings.standby else hb)
        self.session = IngestSession(make_ingest_bus, ingest=self.ingest, replies=replies,
                                     tracker=self.tracker, leadership=self.leadership,
                                     topics=topics, queue=settings.ingest_queue, log=runtime.log)

        async def publish_pace(topic: str, payload: bytes) -> None:
            await bus.publish(topic, payload, qos=1, retain=True)

        self.pacing = Pacing(
            Pacer(PaceConfig(bound=settings.max_in_flight, target=settings.pace_target)),
            gate=self.gate, in_flight=self.tracker.in_flight, publish=publish_pace,
            topics=topics, node=runtime.node, active=lambda: self.leadership.active,
            log=runtime.log)
        self.broker = BrokerFigures()
        runtime.metrics.on_collect(self._read)
        runtime.metrics.on_collect(self.broker.read)
        self._unserved_since: float | None = None  # since when no online worker serves it
        runtime.require(lambda: self._workers() or self.unserved())
        runtime.require(lambda: None if self.leadership.active or self.leadership.standby_alive(
            time.monotonic()) else "no member of the group holds the ingest session yet")

    async def _refuse(self, task: Task, why: str) -> None:
        if self.tracker.complete(task.task_id) is not None:
            await self.results.answer(task.owed(), "error", error=why)

    def _workers(self) -> str | None:
        return None if self.dispatcher.worker_bundles(fresh=False) \
            else "no segment-worker seen yet"

    def unserved(self) -> str | None:
        """Why no online worker can serve this bundle's frames (None: one can, or none is
        online and frames wait for one)."""
        return unserved(self.rt.bundle, self.dispatcher.worker_bundles())

    async def _answer_unserved(self) -> None:
        """Frames that no online worker can serve are answered ``error`` naming the bundles,
        once that has lasted ``progress_timeout_s`` (not held until the admission-controller
        stops, as they were when services were started on different bundles)."""
        why, now = self.unserved(), time.monotonic()
        if why is None:
            if self._unserved_since is not None:
                self.rt.log.info("bundle_served", bundle=self.rt.bundle)
            self._unserved_since = None
            return
        if self._unserved_since is None:
            self._unserved_since = now
            self.rt.log.error("bundle_unserved", bundle=self.rt.bundle, why=why)
        if now - self._unserved_since >= self.s.progress_timeout_s:
            for task in self.dispatcher.withdraw():
                self.counts["unserved"] += 1
                await self._refuse(task, why)

    def new_id(self) -> str:
        return f"{self.id_prefix}{next(self.ids)}"

    def _read(self, r: Reading) -> None:
        r.gauge("offramp_in_flight", "Frames owned and not yet answered", len(self.tracker))
        r.gauge("offramp_pending", "Frames waiting for a worker's credit",
                self.dispatcher.waiting())
        r.counter("offramp_unserved_total", "Frames answered 'error' because no online worker "
                  "serves this bundle (services started on different bundles)",
                  self.counts["unserved"])
        r.counter("offramp_answers_forgotten_total", "Answers forgotten before the dedup window "
                  "ended (OFFRAMP_ADMISSION_ANSWERS_KEPT full): a frame sent again after is "
                  "told nothing", self.answers.evicted)
        r.counter("offramp_packets_split_total", "Batches sent as several packets because one "
                  "would not fit the broker's packet limit", self.dispatcher.split)
        for source in sorted(set(self.registry.known()) | set(self.gate.sources())):
            spec = self.registry.lookup(source)
            if spec is not None:  # an info metric: dashboards join it on source for priority
                r.gauge("offramp_source_info", "1 per source served, labelled with its priority",
                        1, source=source, priority=f"{spec.priority:g}")
        for source in self.pacing.pacer.sources():
            rate = self.pacing.pacer.advised(source)
            if rate is not None:
                r.gauge("offramp_pace_hz", "Frames/s each source is told to send at "
                        "(control/pace/<source>)", rate, source=source)
        for key, value in self.gate.stats().items():
            if key.startswith("admitted_rate:"):
                r.gauge("offramp_admitted_rate", "Admitted frames/s per source (strategy rate)",
                        value, source=key.split(":", 1)[1])

    # -- completions, liveness, deadlines, control ---------------------------------------------
    async def completions(self, reports: Subscription[DoneReport]) -> None:
        async for report in reports:
            for moved in report.moved:
                self.tracker.moved(moved.task_id, moved.attempt, moved.node)
            for done in report.completions:
                task = self.tracker.complete(done.task_id)
                if task is not None:
                    await self.results.answer(task.owed(), "ok", done=done)
                elif not done.task_id.startswith(self.id_prefix):
                    self.counts["stale_completions"] += 1  # an earlier incarnation's task
            again = []
            for refused in report.refused:  # a worker could not take it: sent again now
                task = self.tracker.refused(refused.task_id, refused.attempt)
                if task is None:
                    continue
                if task.attempt >= self.s.max_attempts or task.x is None:
                    await self._refuse(task, f"not taken after {task.attempt} dispatches: "
                                             f"{refused.reason}")
                else:
                    again.append(task)
            if again:
                self.counts["refused_by_workers"] += len(again)
                self.dispatcher.submit(again)
            for failed in report.failed:  # its frame did not decode at the first worker
                task = self.tracker.complete(failed.task_id)
                if task is not None:
                    await self.results.answer(task.owed(), "error", error=failed.error)

    async def states(self, states: Subscription[Heartbeat]) -> None:
        async for hb in states:
            if self.dispatcher.observe(hb):
                self._redispatch(hb.node, "offline")

    def _redispatch(self, node: str, why: str) -> None:
        """Send again, at once, every task ``node`` holds (its first hop, or a later one its
        holder reported): it is gone, or has stopped answering."""
        lost = self.tracker.lost(node)
        if lost:
            self.rt.log.warning("worker_lost", worker=node, why=why, redispatch=len(lost))
            self.counts["redispatched"] += len(lost)
            self.dispatcher.submit([t for t in lost if t.x is not None])

    async def answered_elsewhere(self) -> None:
        """While another member of the group holds the ingest session, the frames it answers
        are remembered here: one it answered and had not acknowledged when it died comes to
        this member when it takes over, and is acknowledged without a second answer. Not
        listened to while this member is active (its own answers are known to it)."""
        bus, topics = self.rt.bus, self.rt.topics
        while True:
            await self.session.until(active=False)
            answers = await bus.subscribe(topics.results_all(), maxsize=100_000,
                                          overflow="drop-oldest")
            try:
                while self._standing_by():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WATCH_TICK_S):
                            self._remember(await answers.get())
                for msg in answers.inbox.drain():  # what came before the takeover
                    self._remember(msg)
            finally:
                await answers.close()

    def _standing_by(self) -> bool:
        return not self.leadership.active

    def _remember(self, msg: Message) -> None:
        try:
            results = read_results(msg.payload)
        except WireError:
            return
        now = time.monotonic()
        for r in results:
            # not kept to be told again: what comes again after a takeover is the broker
            # handing over what the member before did not acknowledge, answered already
            self.ingest.remember(r.source, r.frame_id, now)

    async def broker_figures(self, figures: Subscription[Message]) -> None:
        async for msg in figures:
            self.broker.observe(msg)

    async def members(self, states: Subscription[Heartbeat]) -> None:
        """The other admission-controllers of this group, for the leadership."""
        async for hb in states:
            if hb.node != self.leadership.node and (hb.online is False
                                                    or hb.group == self.s.group):
                self.leadership.observe(hb, time.monotonic())
                self.session.heard()

    async def registrations(self, registrations: Subscription[Registration]) -> None:
        async for reg in registrations:
            spec = self.registry.apply(reg)
            self.rt.log.info("source_registered", source=reg.source,
                             priority=spec.priority if spec else None)

    async def plans(self, plans: Subscription[Plan]) -> None:
        async for plan in plans:
            self.dispatcher.apply_plan(plan)

    async def sweeper(self) -> None:
        while True:
            await self._sweep_due()
            sweep = self.tracker.sweep(time.time(), self.dispatcher.path_backlog(0.0))
            for t in sweep.expired:
                await self.results.answer(t.owed(), "expired", error="deadline passed")
            for t in sweep.failed:
                await self.results.answer(t.owed(), "error",
                                          error=f"no result after {t.attempt} dispatches")
            if sweep.redispatch:
                self.counts["redispatched"] += len(sweep.redispatch)
                self.dispatcher.submit(sweep.redispatch)
            await self._answer_unserved()
            for node in self.tracker.holders():
                if self.dispatcher.silent(node):
                    self._redispatch(node, "silent")

    async def _sweep_due(self) -> None:
        """Sweep every SWEEP_S while frames are in flight. With none, nothing can expire or
        be lost: wait for the first one, sweeping every IDLE_SWEEP_S all the same (a worker
        set that serves no bundle is reported while idle too)."""
        if len(self.tracker):
            await asyncio.sleep(SWEEP_S)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_SWEEP_S):
                await self.tracker.occupied()

    async def control(self) -> None:
        """The rate strategy's loop: adapt admitted rates, let waiting frames through. Under
        any other strategy no frame waits at the gate and no rate adapts: nothing to wake for."""
        if not self.gate.adaptive:
            return
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
                self.ingest.release(released)

    def _priority(self, source: str) -> float:
        info = self.registry.lookup(source)
        return info.priority if info else self.s.sources.default_priority

    def heartbeat(self, hb: Heartbeat) -> Heartbeat:
        stats = {k: float(v) for k, v in self.counts.items()}
        stats["handed_over"] = float(self.session.handed_over)
        stats["in_flight"] = float(len(self.tracker))
        stats["duplicates"] = float(self.tracker.duplicates)
        stats["pending"] = float(self.dispatcher.waiting())
        stats["sources"] = float(len(self.sources))
        stats["sources_evicted"] = float(self.sources.evicted)
        stats["sources_refused"] = float(self.sources.refused)
        stats["answers_kept"] = float(len(self.answers))
        stats["answers_forgotten"] = float(self.answers.evicted)
        stats["paces_told"] = float(self.pacing.told)
        stats.update(self.gate.stats(self.s.heartbeat_sources))
        return self.dispatcher.heartbeat(replace(
            hb, stats=stats, group=self.s.group, active_since=self.leadership.active_since,
            arrivals=self.gate.arrivals(self.s.heartbeat_sources)))




async def run(settings: AdmissionSettings, stop: asyncio.Event, *,
              connect: BusFactory | None = None) -> None:
    """Serve until ``stop`` is set (``connect`` makes the bus; default: MQTT)."""
    bundle = load_bundle(settings.bundle)
    return_large_blocks()  # decoded frames' buffers go back to the OS when freed
    refuse_by_budget_only()  # Pillow's own bomb warning: offramp's budget says it
    runtime = Runtime("admission", settings.common, bus=connect,
                      bundle=await asyncio.to_thread(lambda: bundle.identity))
    ingest_id = f"offramp-ingest-{settings.group}"

    def ingest_bus() -> MessageBus:
        if connect is not None:
            return connect(ingest_id, None)
        return Bus(settings.ingest_bus(), ingest_id, manual_ack=True,
                   receive_maximum=settings.ingest_window)

    adm = Admission(settings, bundle, runtime, ingest_bus)
    runtime.heartbeat_with(adm.heartbeat)
    max_bytes = settings.common.bus.max_message_bytes
    async with runtime, adm.results:
        bus, topics = runtime.bus, runtime.topics
        done = await bus.subscribe(topics.done_all(), qos=1, maxsize=65536, decode=from_payload(
            partial(DoneReport.decode, max_bytes=max_bytes)))
        workers = await bus.subscribe(topics.state_all("worker"), maxsize=1024,
                                      decode=from_payload(Heartbeat.decode))
        members = await bus.subscribe(topics.state_all("admission"), maxsize=64,
                                      decode=from_payload(Heartbeat.decode))
        sources = await bus.subscribe(topics.source_all(), qos=1, maxsize=1024,
                                      decode=registration(topics))
        plans = await bus.subscribe(topics.plan(), maxsize=8, overflow="drop-oldest",
                                    decode=from_payload(Plan.decode))
        figures = await bus.subscribe(SYS_TOPICS, maxsize=64)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in (
                adm.dispatcher.run(), adm.completions(done), adm.states(workers),
                adm.members(members), adm.registrations(sources), adm.plans(plans),
                adm.sweeper(), adm.control(), adm.broker_figures(figures),
                adm.answered_elsewhere())]
            tasks.append(tg.create_task(adm.session.hold(tg)))
            if settings.pace_interval_ms > 0:
                tasks.append(tg.create_task(adm.pacing.run(settings.pace_interval_ms / 1000)))
            await stop.wait()
            if adm.leadership.active:  # before a standby takes over and tells its own
                await adm.pacing.withdraw()
            adm.session.pause()
            await adm.session.drain(settings.drain_s)
            for t in tasks:
                t.cancel()


SERVICE = ServiceSpec(name="admission-controller", module="admission_controller",
                      settings=AdmissionSettings, prefix=PREFIX, run=run)
