"""The worker's data path: queue -> micro-batch -> segment and exit decision (together, on the
inference thread) -> completion, or on to the next segment (in memory when local, on the GPU
when activations are resident, over the bus otherwise).

Segments come and go while running (the plan): :meth:`Engine.host` loads one, :meth:`Engine.
release` stops advertising it and lets it drain; the service unloads it once it is empty.
:meth:`Engine.drain` stops advertising every segment (the worker is stopping). Where the next
task goes is :mod:`segment_worker.placer`'s business; the engine gives it this node's side
(:class:`~segment_worker.placer.Stages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import numpy as np
import structlog
from prometheus_client import Histogram

from offramp.bus import Topics
from offramp.bus.inbox import RateLimitedWarning
from offramp.bus.outbox import Outbox
from offramp.errors import WireError
from offramp.model.bundle import Bundle
from offramp.model.frames import decode_frames
from offramp.model.inputs import FrameError
from offramp.model.resident import Activation, Batch, Outputs, Row, on_host, stack_on_host
from offramp.model.sessions import SegmentRunner
from offramp.node.metrics import BATCH_BUCKETS, Metrics
from offramp.node.peers import PeerTable
from offramp.node.tracing import Tracing
from offramp.policy.credits import CreditLedger
from offramp.policy.exits import ExitDecision, decide
from offramp.policy.links import LinkMeter, PathMeter, QueuePeak
from offramp.policy.offload import Candidate
from offramp.wire import (
    ActivationPacket,
    Completion,
    DoneReport,
    ExitPolicy,
    ExitReason,
    Failed,
    Hop,
    Moved,
    Refused,
    Sample,
    SegmentLoad,
    Tensor,
)
from segment_worker.codecs import Codecs
from segment_worker.link import Link
from segment_worker.placer import Outlet, Placer
from segment_worker.queue import Item, SegmentQueue
from segment_worker.settings import EngineConfig
from segment_worker.spans import record_batch

Publish = Callable[[str, bytes, int], Awaitable[None]]  # topic, payload, qos
R = TypeVar("R")  # an entry of a done report: Failed, Moved or Refused
IN_FLIGHT = 2  # micro-batches per segment handed to the inference thread at once


@dataclass
class SegmentStats:
    service_s: float = 0.0  # EWMA of seconds per sample
    batches: int = 0
    samples: int = 0
    exited: int = 0
    forwarded: int = 0
    handed_over: int = 0

    def record(self, batch: int, seconds: float) -> None:
        per = seconds / batch
        self.service_s = per if self.service_s == 0 else 0.8 * self.service_s + 0.2 * per
        self.batches += 1
        self.samples += batch


@dataclass
class Hosted:
    """One segment this worker runs: its session, queue, statistics and credit ledger."""

    runner: SegmentRunner
    queue: SegmentQueue
    ledger: CreditLedger
    batch_sizes: Histogram  # this segment's child of offramp_batch_size
    stats: SegmentStats = field(default_factory=SegmentStats)
    draining: bool = False
    busy: int = 0  # samples of this segment being computed now
    # samples taken off the wire on credit and not queued yet (a first hop's frames are decoded
    # first): the credit room counts them, or a grant made meanwhile overfills the queue
    arriving: int = 0


@dataclass
class Counters:
    bad_packets: int = 0
    misrouted: int = 0
    expired: int = 0
    queue_overflow: int = 0
    without_credit: int = 0
    undecodable: int = 0  # frames sent as the camera's bytes that did not decode here
    # CPU seconds of the inference thread inside the segments' sessions (with one intra-op
    # thread, ONNX Runtime computes on that thread), and of the decode thread on frames
    infer_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    completions: int = 0
    publish_failed: int = 0


@dataclass(frozen=True)
class _Rule:
    """The exit rule for one micro-batch, fixed when it is taken."""

    criterion: str
    threshold: float | None
    last: bool
    to_next: float  # expected seconds to the next exit (the deadline rule)
    prev: np.ndarray | None  # the previous exit's embeddings (feature difference)
    deadlines: np.ndarray  # wall clock, nan: none


@dataclass(frozen=True)
class _Computed:
    """One segment's run of a micro-batch, as the inference thread hands it back."""

    out: Outputs
    decision: ExitDecision
    stay: list[int]  # rows that go on
    # their activations: kept (copied out of the run's buffers) after the last segment of a
    # run-through, only referenced where the next segment of it already took them
    kept: list[Activation]
    started: float
    finished: float


class Engine:
    """Use as ``async with Engine(...) as engine:`` (its publishes live in task groups of its
    own; the inference thread is shut down on the way out)."""

    def __init__(self, bundle: Bundle, cfg: EngineConfig, topics: Topics, peers: PeerTable,
                 publish: Publish, boot: float | None = None,
                 metrics: Metrics | None = None,
                 nudge: Callable[[], None] = lambda: None,
                 tracing: Tracing | None = None,
                 max_payload: Callable[[str], int] = lambda topic: 0,
                 unsent: Callable[[], int] = lambda: 0) -> None:
        self.bundle = bundle
        self.model = bundle.name
        self.cfg = cfg
        self.topics = topics
        self.publish = publish
        self.nudge = nudge  # sends this node's heartbeat early (credit or a request in it)
        self.boot = time.time() if boot is None else boot
        self.tracing = tracing
        self.log = structlog.get_logger("offramp.worker").bind(node=cfg.node, model=self.model)
        self.policy: ExitPolicy | None = None
        self.hosted: dict[int, Hosted] = {}
        self.counters = Counters()
        self._refused: list[tuple[str, Refused]] = []  # (source, sample not taken), untold
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{cfg.node}")
        # frames that come as the camera's bytes are decoded beside inference, not before it
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix=f"decode-{cfg.node}")
        self.outbox = Outbox(1024, grace_s=2.0)  # done reports still going out at the end
        self.meter = LinkMeter()  # fed with the connection's counters by the service
        self.paths = PathMeter()  # what arrives from each sender
        self.unsent = unsent  # bytes published and not yet taken by the network
        self.queue_peak = QueuePeak()  # how long that took to drain, lately (heartbeat)
        self.codecs = Codecs(bundle, mode=cfg.codec, max_loss=cfg.codec_max_loss,
                             batch=cfg.batch_max, offload=self._offload, log=self.log)
        self.link = Link(self._send_packet, rate_bps=cfg.link_bits_per_s,
                         delay_s=cfg.link_delay_s)
        out = Outlet(self.link.send, lambda seg, node: topics.act(self.model, seg, node),
                     nudge=nudge, uplink=self.uplink, encode=self._encode,
                     wire=self.codecs.wire, max_payload=max_payload, on_host=self._on_host,
                     unsent=unsent)
        self.placer = Placer(cfg, model=self.model, boot=self.boot, peers=peers, stages=self,
                             out=out)
        self.warming: str | None = None  # what a segment being loaded is doing (readiness)
        self.transfers: Counter[str] = Counter()  # copies made by resident segments, all told
        self.draining = False  # the worker is stopping: nothing advertised, no credit
        self._warn = RateLimitedWarning()
        self._inflight = 0
        self.segment_flops = {s.index: s.flops for s in bundle.manifest.segments}
        self._measured: dict[int, float] = {}  # segment -> seconds per sample at load
        self.m_batch = (metrics or Metrics()).histogram(
            "offramp_batch_size", "Micro-batch sizes, by segment", BATCH_BUCKETS, ["segment"])
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self._stack.enter_async_context(self.outbox)
        await self._stack.enter_async_context(self.link.outbox)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.decoder.shutdown(wait=False, cancel_futures=True)

    @property
    def providers(self) -> list[str]:
        providers: list[str] = next(iter(self.hosted.values())).runner.providers
        return providers

    @property
    def gpu_libraries(self) -> str:
        """What ONNX Runtime said of CUDA libraries it could not load ('': none missing)."""
        return next((h.runner.gpu_libraries for h in self.hosted.values()), "")

    @property
    def device(self) -> str:
        """The device the hosted segments run on ('' while none is hosted)."""
        return next((h.runner.device for h in self.hosted.values()), "")

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the inference thread (sessions are used from that thread only)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _encode(self, segment: int, node: str, x: np.ndarray) -> tuple[Tensor, str]:
        """The activation entering ``segment`` on ``node``, encoded for the path there, and the
        codec's name."""
        rate = self.placer.peers.rate_to(node, self.uplink()[0])
        option = await self.codecs.choose(segment - 1, node, rate)
        return await self.codecs.encode(option, x), option.cost.codec

    async def _on_host(self, xs: list[Activation]) -> np.ndarray:
        """Queued activations as one host array; device rows are copied on the inference
        thread (which the sessions and their buffers belong to)."""
        if any(isinstance(x, Row) for x in xs):
            host: np.ndarray = await self._offload(on_host, xs)
            return host
        return on_host(xs)

    def uplink(self) -> tuple[float, float]:
        """This node's outgoing link, bytes/s (0: unknown) and round trip: as emulated where
        set (``OFFRAMP_WORKER_LINK_*``), else as measured on the connection to the broker."""
        return (self.cfg.link_bits_per_s / 8 or self.meter.bytes_per_s,
                self.cfg.link_delay_s or self.meter.rtt_s)

    def serving(self) -> list[int]:
        """Segments advertised to others (hosted and not draining; none once the worker
        drains)."""
        if self.draining:
            return []
        return sorted(s for s, h in self.hosted.items() if not h.draining)

    def drain(self) -> None:
        """Stop advertising every segment and granting credit; what is queued is still served."""
        self.draining = True

    # -- hosting ----------------------------------------------------------------------------------
    def load(self, segment: int, position: tuple[int, int] = (1, 1)) -> Hosted:
        """Create the session and run it at its batch size, twice: the first run builds what
        the device needs (TensorRT engines, cuDNN plans, the CUDA graph), the second measures
        it. Blocking: call it off the event loop. ``position``: this load's place among those
        under way (i of n), for :attr:`warming`."""
        cfg = self.cfg
        i, n = position
        building = cfg.device == "tensorrt"
        self.warming = (f"building TensorRT engines, segment {i} of {n}" if building
                        else f"loading segment {i} of {n}")
        started = time.monotonic()
        if building:
            self.log.info("engine_build_started", segment=segment, batch=cfg.batch_max,
                          precision=cfg.gpu.trt_precision, cache=cfg.gpu.trt_cache or None)
        try:
            runner = SegmentRunner(self.bundle, segment, device=cfg.device, threads=cfg.threads,
                                   gpu=cfg.gpu, resident=cfg.resident, transfers=self.transfers,
                                   static_batch=cfg.batch_max if cfg.device != "cpu" else 0)
            if runner.graph_refused:
                self.log.warning("cuda_graph_unavailable", segment=segment,
                                 error=runner.graph_refused)
            hosted = Hosted(runner, SegmentQueue(cfg.queue_max, cfg.ageing_s),
                            CreditLedger(cfg.queue_max, cfg.credit_lease_s),
                            self.m_batch.labels(segment=segment))
            x = np.zeros((cfg.batch_max, *runner.spec.input.per_sample), np.float32)
            self._infer_on(runner, x)  # warm-up: engines, plans, graph capture
            if building:
                self.log.info("engine_build_finished", segment=segment,
                              seconds=round(time.monotonic() - started, 1),
                              providers=runner.providers)
            _, t0, t1 = self._infer_on(runner, x)
        finally:
            self.warming = None
        hosted.stats.service_s = (t1 - t0) / cfg.batch_max
        self._measured[segment] = hosted.stats.service_s
        return hosted

    def host(self, segment: int, hosted: Hosted) -> None:
        self.hosted[segment] = hosted

    def release(self, segment: int) -> None:
        if segment in self.hosted:
            self.hosted[segment].draining = True

    def reclaim(self, segment: int) -> None:
        """Undo a release that has not finished (the plan gave the segment back)."""
        if segment in self.hosted:
            self.hosted[segment].draining = False

    def drained(self, segment: int) -> bool:
        h = self.hosted.get(segment)
        return h is None or (h.draining and len(h.queue) == 0 and h.busy == 0
                             and not self.placer.parked(segment))

    def unload(self, segment: int) -> None:
        self.hosted.pop(segment, None)

    # -- intake ---------------------------------------------------------------------------------
    async def accept(self, payload: bytes, max_bytes: int, received: float = 0.0) -> int:
        """Decode one packet and queue its samples; bad packets are counted, never raised.
        ``received``: when the bus took it off the connection (wall clock), for the path's
        rate from its sender."""
        try:
            packet = ActivationPacket.decode(payload, max_bytes=max_bytes)
            if packet.sender and received:
                self.paths.observe(packet.sender, len(payload), packet.sent, received)
            x = (None if packet.tensor is None
                 else await self.codecs.decode(packet.tensor, packet.segment - 1))
            prev = packet.embedding.to_numpy() if packet.embedding is not None else None
        except WireError as exc:
            self.counters.bad_packets += 1
            if n := self._warn.should_log():
                self.log.warning("bad_packet", error=str(exc), count=n)
            return 0
        hosted = self.hosted.get(packet.segment)
        if packet.model != self.model or hosted is None:
            self.counters.misrouted += len(packet.samples)
            if packet.model == self.model:  # a plan moved the segment: sent again at once
                self._refuse(packet.samples, f"segment {packet.segment} is not hosted on "
                             f"{self.cfg.node}")
                await self.report_refused()
            return 0
        now = time.time()
        if packet.sender and not hosted.ledger.received(packet.sender, packet.sender_boot,
                                                        len(packet.samples), time.monotonic()):
            self.counters.without_credit += len(packet.samples)
        live = [i for i, s in enumerate(packet.samples)
                if s.deadline is None or s.deadline >= now]
        self.counters.expired += len(packet.samples) - len(live)  # answered 'expired' there
        rows: dict[int, Any]
        if x is None:  # the camera's bytes: decoded here, on the decode thread
            hosted.arriving += len(live)
            try:
                decoded = await asyncio.get_running_loop().run_in_executor(
                    self.decoder, self._decode, [packet.inputs[i] for i in live])
            finally:
                hosted.arriving -= len(live)
            rows = dict(zip(live, decoded, strict=True))
            await self._undecodable([(packet.samples[i], r) for i, r in rows.items()
                                     if isinstance(r, FrameError)])
            live = [i for i in live if not isinstance(rows[i], FrameError)]
        else:
            rows = {i: x[i] for i in live}
        items = [Item(packet.samples[i], rows[i], None if prev is None else prev[i], now,
                      packet.sent) for i in live]
        taken = self.enqueue(packet.segment, items)
        await self.report_refused()
        return taken

    def _decode(self, frames: list[bytes]) -> list[np.ndarray | FrameError]:
        """On the decode thread: the model inputs of frames sent as the camera's bytes."""
        cpu = time.thread_time()
        out = decode_frames(frames, self.bundle.manifest.input, self.cfg.max_pixels)
        self.counters.decode_cpu_s += time.thread_time() - cpu
        return out

    async def _undecodable(self, failed: list[tuple[Sample, FrameError]]) -> None:
        """Frames whose bytes did not decode here: each is reported to its owner, who answers
        it ``error`` with the reason (and does not dispatch it again)."""
        if not failed:
            return
        self.counters.undecodable += len(failed)
        if n := self._warn.should_log():
            self.log.warning("frame_undecodable", frames=len(failed), error=str(failed[0][1]),
                             count=n)
        await self._tell_owners(
            [(s.source, Failed(task_id=s.task_id, attempt=s.attempt, error=str(exc)))
             for s, exc in failed], lambda entries: DoneReport(failed=entries), qos=1)

    async def _tell_owners(self, entries: list[tuple[str, R]],
                           report: Callable[[tuple[R, ...]], DoneReport], qos: int) -> None:
        """One done report per source, on that source's done topic, for its owner."""
        by_source: dict[str, list[R]] = {}
        for source, entry in entries:
            by_source.setdefault(source, []).append(entry)
        for source, mine in by_source.items():
            await self.outbox.send(self._publish(self.topics.done(source),
                                                 report(tuple(mine)).encode(), qos))

    def enqueue(self, segment: int, items: list[Item]) -> int:
        rejected = self.hosted[segment].queue.push(items)
        if rejected:
            self.counters.queue_overflow += len(rejected)
            self.log.warning("queue_overflow", segment=segment, dropped=len(rejected),
                             bound=self.cfg.queue_max)
            self._refuse([it.sample for it in rejected],
                         f"segment {segment}'s queue on {self.cfg.node} is full")
        return len(items) - len(rejected)

    def _refuse(self, samples: Sequence[Sample], reason: str) -> None:
        self._refused += [(s.source, Refused(task_id=s.task_id, attempt=s.attempt,
                                             reason=reason)) for s in samples]

    async def report_refused(self) -> None:
        """Tell the owners of the samples this worker could not take, so that they dispatch
        those frames again now rather than after their progress timeout. Called after each
        packet taken in and each batch passed on."""
        if self._refused:
            refused, self._refused = self._refused, []
            await self._tell_owners(refused, lambda entries: DoneReport(refused=entries), qos=1)

    # -- this node's side of placement (segment_worker.placer.Stages) -------------------------
    def local_candidate(self, segment: int, priority: float) -> Candidate | None:
        """This node for ``segment``, unless it does not host it or the plan took it away. A
        draining worker still takes its own work from one segment to the next."""
        h = self.hosted.get(segment)
        if h is None or h.draining:
            return None
        per = h.stats.service_s
        room = self.cfg.queue_max - len(h.queue) - h.ledger.outstanding()
        backlog = sum(n for p, n in h.queue.by_priority() if p >= priority) * per
        return Candidate(self.cfg.node, backlog, per, local=True, credit=max(0, room))

    def hand_over(self, segment: int, items: list[Item]) -> None:
        self.hosted[segment].stats.handed_over += self.enqueue(segment, items)

    async def passed_on(self, segment: int, node: str, items: list[Item]) -> None:
        """Count them as forwarded by the segment before, and tell each frame's owner who
        holds it now (QoS 0, best effort: without it the owner waits for its progress
        timeout if ``node`` dies holding them)."""
        if segment - 1 in self.hosted:
            self.hosted[segment - 1].stats.forwarded += len(items)
        await self._tell_owners(
            [(it.sample.source, Moved(task_id=it.sample.task_id, attempt=it.sample.attempt,
                                      node=node)) for it in items],
            lambda entries: DoneReport(moved=entries), qos=0)
        await self.report_refused()  # what a hand-over here could not queue, if any

    def forget(self, node: str) -> None:
        """``node`` went offline: the credit it granted, and the credit granted to it, go."""
        self.placer.forget(node)
        for h in self.hosted.values():
            h.ledger.forget(node)

    # -- serving --------------------------------------------------------------------------------
    async def serve(self, segment: int, stop: asyncio.Event) -> None:
        """Serve ``segment`` until ``stop`` is set and its queue is empty (or it is unloaded).
        Up to IN_FLIGHT micro-batches at once: the next is taken and handed to the inference
        thread while the event loop still accounts for the one before (reports, hops, the
        next placement), so that neither thread waits for the other. The batch is taken only
        once a slot is free, so it is the most urgent one at that moment."""
        hosted = self.hosted[segment]
        slots = asyncio.Semaphore(IN_FLIGHT)
        async with asyncio.TaskGroup() as batches:
            while not (stop.is_set() and len(hosted.queue) == 0):
                await self.placer.room(segment + 1)  # backpressure: parked work must fit
                await slots.acquire()
                try:
                    items = await hosted.queue.batch(self.cfg.batch_max, self.cfg.batch_wait_s)
                except BaseException:
                    slots.release()
                    raise
                if self.credit_due():
                    self.nudge()
                self._inflight += len(items)
                hosted.busy += len(items)
                batches.create_task(self._serve_batch(segment, hosted, items, slots))

    async def _serve_batch(self, segment: int, hosted: Hosted, items: list[Item],
                           slot: asyncio.Semaphore) -> None:
        try:
            await self._run_batch(segment, hosted, items)
        finally:
            self._inflight -= len(items)
            hosted.busy -= len(items)
            slot.release()
        await self.placer.retry()

    def idle(self) -> bool:
        return self.busy() == 0 and not self.placer.parked()

    def busy(self) -> int:
        """Samples queued or being computed here, plus publishes not yet done."""
        return (self._inflight + len(self.outbox) + len(self.link)
                + sum(len(h.queue) for h in self.hosted.values()))

    def _infer_on(self, runner: SegmentRunner, xs: Batch) -> tuple[Outputs, float, float]:
        started, cpu = time.time(), time.thread_time()
        out = runner.run_rows(xs)
        self.counters.infer_cpu_s += time.thread_time() - cpu
        if self.cfg.slowdown > 1.0:  # emulated slower node: this thread sleeps, as if throttled
            time.sleep((time.time() - started) * (self.cfg.slowdown - 1.0))
        return out, started, time.time()

    def _compute_through(self, runners: list[SegmentRunner], xs: Batch,
                         rules: list[_Rule]) -> list[_Computed]:
        """On the inference thread: run consecutive segments on a micro-batch, each followed
        by its exit decision (pure, on the policy as it was when the batch was taken), the
        rows that stay going straight into the next one (on the device when resident: one
        gather out of the run's buffer). Stops early when every row has exited. The rows
        that go on after the last are kept (copied out before its session runs again)."""
        done: list[_Computed] = []
        rule = rules[0]
        for j, runner in enumerate(runners):
            out, started, finished = self._infer_on(runner, xs)
            d = decide(rule.criterion, rule.threshold, out.logits, out.embedding, rule.prev,
                       last=rule.last, deadlines=rule.deadlines, now=finished,
                       time_to_next_s=rule.to_next)
            stay = [i for i in range(len(d.exits)) if not d.exits[i]]
            if not stay or out.activation is None or j == len(runners) - 1:
                kept = runner.keep(out.activation, stay) if stay and out.activation is not None \
                    else []
                done.append(_Computed(out, d, stay, kept, started, finished))
                break
            xs = runner.pass_on(out.activation, stay)
            done.append(_Computed(out, d, stay, list(xs), started, finished))
            rule = replace(rules[j + 1], prev=out.embedding[stay],
                           deadlines=rule.deadlines[stay])
        return done

    def _through(self, segment: int, items: list[Item]) -> list[int]:
        """``segment`` and the segments after it that this micro-batch runs in the same
        hand-off to the inference thread: each hosted here and serving, with nothing queued
        or parked for it (no one is overtaken), and here the placer's choice for the batch
        now (a neighbour with less backlog still gets the work between segments)."""
        chain = [segment]
        if not self.cfg.run_through:
            return chain
        priority = max(it.sample.priority for it in items)
        while chain[-1] < self.bundle.num_segments:
            nxt = chain[-1] + 1
            h = self.hosted.get(nxt)
            if (h is None or h.draining or len(h.queue)
                    or not self.placer.stays_here(nxt, priority, len(items),
                                                  self.bundle.segment(chain[-1]).activation_bytes)):
                break
            chain.append(nxt)
        return chain

    def _rule(self, segment: int, items: list[Item], policy: ExitPolicy | None) -> _Rule:
        last = segment == self.bundle.num_segments
        prevs = [it.prev for it in items if it.prev is not None]
        deadlines = [it.sample.deadline for it in items]
        to_next = 0.0
        if not last and any(t is not None for t in deadlines):  # only the deadline rule reads it
            per_sample = self.bundle.segment(segment).activation_bytes
            to_next = self.placer.estimate(segment + 1, per_sample * len(items))
        threshold = None
        if policy is not None and not last and segment <= len(policy.thresholds):
            threshold = policy.thresholds[segment - 1]
        return _Rule(policy.criterion if policy else "confidence", threshold, last, to_next,
                     np.stack(prevs) if len(prevs) == len(items) else None,
                     np.array([math.nan if t is None else t for t in deadlines]))

    async def _run_batch(self, segment: int, hosted: Hosted, items: list[Item]) -> None:
        policy = self.policy
        chain = self._through(segment, items)
        rules = [self._rule(s, items, policy) for s in chain]
        later = [self.hosted[s] for s in chain[1:]]
        for h in later:  # computed now, though nothing is queued there: not to be unloaded
            h.busy += len(items)
        try:
            computed: list[_Computed] = await self._offload(
                self._compute_through, [self.hosted[s].runner for s in chain],
                stack_on_host([it.x for it in items]), rules)
        finally:
            for h in later:
                h.busy -= len(items)
        thresholds = tuple(policy.thresholds) if policy else ()
        for j, c in enumerate(computed):
            seg = chain[j]
            samples = await self._finish(seg, self.hosted[seg], items, c, thresholds)
            if j + 1 < len(computed):  # on into the next segment of the run-through, here
                self.hosted[chain[j + 1]].stats.handed_over += len(c.stay)
                items = [Item(samples[i], x, c.out.embedding[i], c.finished, c.finished)
                         for i, x in zip(c.stay, c.kept, strict=True)]
            elif c.kept:
                now, emb = time.time(), c.out.embedding
                await self.placer.forward(seg + 1, [Item(samples[i], x, emb[i], now, now)
                                                    for i, x in zip(c.stay, c.kept, strict=True)])

    async def _finish(self, segment: int, hosted: Hosted, items: list[Item], c: _Computed,
                      thresholds: tuple[float, ...]) -> list[Sample]:
        """One segment's run of a micro-batch, accounted for: its statistics, each sample's
        hop, the completions of those that exit (reported), their spans. Returns the samples
        with the hop added."""
        started, finished, d = c.started, c.finished, c.decision
        hosted.stats.record(len(items), finished - started)
        hosted.batch_sizes.observe(len(items))
        samples = [replace(it.sample, hops=(*it.sample.hops,
                                            Hop(node=self.cfg.node, segment=segment, arrived=it.arrived,
                                                started=started, finished=finished))) for it in items]
        done: dict[str, list[Completion]] = {}
        for i, sample in enumerate(samples):
            if d.exits[i]:
                done.setdefault(sample.source, []).append(Completion(
                    task_id=sample.task_id, source=sample.source, frame_id=sample.frame_id,
                    attempt=sample.attempt, label=int(d.labels[i]),
                    confidence=float(d.confidence[i]), exit_index=segment,
                    reason=cast(ExitReason, d.reasons[i]),
                    node=self.cfg.node, ts=finished, hops=sample.hops, thresholds=thresholds,
                    created=sample.created))
        if self.tracing is not None and self.tracing.enabled:
            record_batch(self.tracing, self.cfg.node, segment, items, d, started, finished)
        for source, completions in done.items():
            await self.outbox.send(self._report(source, completions))
        hosted.stats.exited += len(items) - len(c.stay)
        return samples

    async def _report(self, source: str, completions: list[Completion]) -> None:
        await self._publish(self.topics.done(source), DoneReport(completions=tuple(completions)).encode(), 1)
        self.counters.completions += len(completions)

    async def _send_packet(self, topic: str, payload: bytes) -> None:
        await self._publish(topic, payload, 0)
        self.sample_queue()

    def sample_queue(self) -> float:
        """How long what waits to go out takes at the link's rate now; recorded for the
        heartbeat's ``queue_s`` (:class:`~offramp.policy.links.QueuePeak`), which it returns."""
        rate = self.uplink()[0]
        now = time.monotonic()
        if rate > 0:
            self.queue_peak.add(now, self.unsent() / rate)
        return self.queue_peak.value(now)

    async def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            await self.publish(topic, payload, qos)
        except Exception as exc:
            self.counters.publish_failed += 1
            if n := self._warn.should_log():
                self.log.warning("publish_failed", topic=topic, error=str(exc), count=n)

    # -- state ----------------------------------------------------------------------------------
    def credit_due(self) -> bool:
        """Whether some sender waits for credit that a hosted segment's queue has room for now."""
        if self.draining:
            return False
        now = time.monotonic()
        requests = self.placer.peers.requests
        return any(h.ledger.due(len(h.queue), requests(self.model, seg, self.cfg.stale_after_s,
                                                       now), self.cfg.batch_max)
                   for seg, h in self.hosted.items() if not h.draining)

    def loads(self, now: float) -> tuple[SegmentLoad, ...]:
        """Queue state and fresh credit grants of every advertised segment (one grant round)."""
        out = []
        for seg in self.serving():
            h = self.hosted[seg]
            st = h.stats
            for sender, boot, count in self.placer.peers.sent_to(self.cfg.node, self.boot,
                                                                 self.model, seg):
                h.ledger.reported(sender, boot, count, now)
            h.ledger.bound = self.credit_bound(seg)
            grants = h.ledger.grant(len(h.queue) + h.arriving,
                                    self.placer.peers.requests(self.model, seg,
                                                               self.cfg.stale_after_s, now), now)
            mean = st.samples / st.batches if st.batches else 0.0
            rate = 1.0 / st.service_s if st.service_s > 0 else 0.0
            out.append(SegmentLoad(model=self.model, segment=seg, queued=len(h.queue),
                                   backlog_s=len(h.queue) * st.service_s, service_rate=rate, mean_batch=mean,
                                   exited=st.exited, forwarded=st.forwarded, bound=self.cfg.queue_max,
                                   by_priority=h.queue.by_priority(), credits=grants))
        return tuple(out)

    def credit_bound(self, segment: int) -> int:
        """The samples of ``segment`` this node grants credit for: ``credit_queue_s`` of work
        at the time a sample takes here from that segment on (through the hosted segments
        after it that a micro-batch runs through), at least two micro-batches, at most
        ``queue_max``. A flood sent at once otherwise sat in one node's queue for seconds
        while the others, done with theirs, idled: the sender keeps what is beyond and gives
        it to whichever node frees first."""
        if self.cfg.credit_queue_s <= 0:
            return self.cfg.queue_max
        chain_s, k = 0.0, segment
        while k in self.hosted and (k == segment or self.cfg.run_through):
            chain_s += self.hosted[k].stats.service_s
            k += 1
        if chain_s <= 0:
            return self.cfg.queue_max
        return min(self.cfg.queue_max, max(2 * self.cfg.batch_max,
                                           math.ceil(self.cfg.credit_queue_s / chain_s)))

    def flops_per_s(self) -> float:
        """The node's speed for the plan: FLOPs over the time of every segment ever loaded
        here, each measured once at load on a full micro-batch. Not the live service rate,
        which moves with batch sizes and with the plan itself (a feedback loop that made plans
        flip between equal nodes)."""
        seconds = sum(self._measured.values())
        return sum(self.segment_flops[s] for s in self._measured) / seconds if seconds else 0.0
