"""A segment-worker's data path, put together: the hosted-segment table
(:mod:`segment_worker.segments`), the batch runner that serves it (:mod:`segment_worker.
batches`), the placer that sends what goes on (:mod:`segment_worker.placer`) and what each
heartbeat advertises (:mod:`segment_worker.advertiser`). The engine itself takes packets in
(decoding the camera's bytes of a first hop), tells each frame's owner what became of it
(completions, refusals, hand-overs, frames that did not decode), and is what the service
talks to: :meth:`Engine.heartbeat`, :meth:`Engine.apply_plan`, :meth:`Engine.apply_policy`,
:meth:`Engine.observe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import structlog

from offramp.bus import Topics
from offramp.bus.inbox import RateLimitedWarning
from offramp.bus.outbox import Outbox
from offramp.bus.tcp_info import TcpInfo
from offramp.errors import WireError
from offramp.model.bundle import Bundle
from offramp.model.frames import decode_frames
from offramp.model.inputs import FrameError
from offramp.model.resident import Activation, Row, on_host
from offramp.model.sessions import SegmentRunner
from offramp.node.metrics import BATCH_BUCKETS, Metrics, Reading
from offramp.node.peers import PeerTable
from offramp.node.tracing import Tracing
from offramp.policy.credits import CreditLedger
from offramp.policy.links import LinkMeter, PathMeter, QueuePeak
from offramp.wire import (
    ActivationPacket,
    Completion,
    DoneReport,
    ExitPolicy,
    Failed,
    Heartbeat,
    Moved,
    Plan,
    Sample,
    Tensor,
)
from segment_worker.advertiser import Advertiser
from segment_worker.batches import BatchRunner
from segment_worker.codecs import Codecs
from segment_worker.link import Link
from segment_worker.placer import Outlet, Placer
from segment_worker.queue import Item, SegmentQueue
from segment_worker.readings import read_metrics
from segment_worker.segments import Hosted, Segments
from segment_worker.settings import EngineConfig

Publish = Callable[[str, bytes, int], Awaitable[None]]  # topic, payload, qos
R = TypeVar("R")  # an entry of a done report: Failed, Moved or Refused


@dataclass(frozen=True)
class Port:
    """The engine's side of the bus: where it publishes, and what the connection says of
    itself (defaults: no early heartbeat, no message limit, nothing unsent)."""

    topics: Topics
    publish: Publish
    nudge: Callable[[], None] = lambda: None  # sends this node's heartbeat early
    max_payload: Callable[[str], int] = lambda topic: 0  # what the bus takes per message
    unsent: Callable[[], int] = lambda: 0  # bytes published and not yet taken by the network


@dataclass
class Counters:
    bad_packets: int = 0
    misrouted: int = 0
    expired: int = 0
    without_credit: int = 0
    undecodable: int = 0  # frames sent as the camera's bytes that did not decode here
    decode_cpu_s: float = 0.0  # CPU seconds of the decode thread on frames
    completions: int = 0
    publish_failed: int = 0


class Engine:
    """Use as ``async with Engine(...) as engine:`` (its publishes live in task groups of its
    own; the inference and decode threads are shut down on the way out)."""

    def __init__(self, bundle: Bundle, cfg: EngineConfig, peers: PeerTable, port: Port, *,
                 boot: float | None = None, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.bundle = bundle
        self.model = bundle.name
        self.segment_count = bundle.num_segments
        self.node = cfg.node
        self.cfg = cfg
        self.port = port
        self.boot = time.time() if boot is None else boot
        self.log = structlog.get_logger("offramp.worker").bind(node=cfg.node, model=self.model)
        self.counters = Counters()
        self.segments = Segments(cfg, {s.index: s.flops for s in bundle.manifest.segments},
                                 self.log)
        # frames that come as the camera's bytes are decoded beside inference, not before it
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix=f"decode-{cfg.node}")
        self.outbox = Outbox(1024, grace_s=2.0)  # done reports still going out at the end
        self.meter = LinkMeter()  # fed with the connection's counters (heartbeat)
        self.paths = PathMeter()  # what arrives from each sender
        self.queue_peak = QueuePeak()  # how long the unsent bytes took to drain, lately
        self.codecs = Codecs(bundle, mode=cfg.codec, max_loss=cfg.codec_max_loss,
                             batch=cfg.batch_max, offload=self._offload, log=self.log)
        self.link = Link(self._send_packet, rate_bps=cfg.link_bits_per_s,
                         delay_s=cfg.link_delay_s)
        out = Outlet(self.link.send, lambda seg, node: port.topics.act(self.model, seg, node),
                     nudge=port.nudge, uplink=self.uplink, encode=self._encode,
                     wire=self.codecs.wire, max_payload=port.max_payload, on_host=self._on_host,
                     unsent=port.unsent, left=self._left)
        self.placer = Placer(cfg, model=self.model, boot=self.boot, peers=peers,
                             stages=self.segments, out=out)
        self.advertiser = Advertiser(self.segments, peers, cfg, model=self.model, boot=self.boot)
        self.batches = BatchRunner(self.segments, self.placer, cfg, bundle, self._completed,
                                   taken=self._credit_check, tracing=tracing)
        self.warming: str | None = None  # what a segment being loaded is doing (readiness)
        self.transfers: Counter[str] = Counter()  # copies made by resident segments, all told
        self._warn = RateLimitedWarning()
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
            self.batches.close()
            self.decoder.shutdown(wait=False, cancel_futures=True)

    # -- what runs here -------------------------------------------------------------------------
    def _runner(self) -> SegmentRunner | None:
        return next((h.runner for _, h in self.segments.items()), None)

    @property
    def providers(self) -> list[str]:
        runner = self._runner()
        return runner.providers if runner is not None else []

    @property
    def gpu_libraries(self) -> str:
        """What ONNX Runtime said of CUDA libraries it could not load ('': none missing)."""
        runner = self._runner()
        return runner.gpu_libraries if runner is not None else ""

    @property
    def device(self) -> str:
        """The device the hosted segments run on ('' while none is hosted)."""
        runner = self._runner()
        return runner.device if runner is not None else ""

    @property
    def static_batch(self) -> int:
        """The batch size the sessions were built for (0: any)."""
        runner = self._runner()
        return runner.static_batch if runner is not None else 0

    @property
    def policy(self) -> ExitPolicy | None:
        return self.batches.policy

    def apply_policy(self, policy: ExitPolicy) -> bool:
        """Use ``policy`` from the next micro-batch on, unless it is older than the one in use
        (a retained message delivered again). Returns whether it was applied."""
        current = self.batches.policy
        if current is not None and policy.epoch < current.epoch and policy.ts <= current.ts:
            return False
        self.batches.policy = policy
        return True

    def apply_plan(self, plan: Plan) -> None:
        """The plan's routes, the placer's fallback when heartbeats are stale (newer plans
        only)."""
        if self.placer.plan is None or plan.epoch > self.placer.plan.epoch:
            self.placer.plan = plan

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
            self.batches.infer(runner, x)  # warm-up: engines, plans, graph capture
            if building:
                self.log.info("engine_build_finished", segment=segment,
                              seconds=round(time.monotonic() - started, 1),
                              providers=runner.providers)
            _, t0, t1 = self.batches.infer(runner, x)
        finally:
            self.warming = None
        hosted.stats.service_s = (t1 - t0) / cfg.batch_max
        return hosted

    def host(self, segment: int, hosted: Hosted) -> None:
        self.segments.host(segment, hosted)

    def hosts(self) -> set[int]:
        return set(self.segments)

    def release(self, segment: int) -> None:
        self.segments.release(segment)

    def reclaim(self, segment: int) -> None:
        """Undo a release that has not finished (the plan gave the segment back)."""
        self.segments.reclaim(segment)

    def drained(self, segment: int) -> bool:
        """Whether a released ``segment`` holds nothing here: queued, computed or parked."""
        return self.segments.empty(segment) and not self.placer.parked(segment)

    def unload(self, segment: int) -> None:
        self.segments.unload(segment)

    def serving(self) -> list[int]:
        return self.segments.serving()

    def drain(self) -> None:
        """Stop advertising every segment and granting credit; what is queued is still served."""
        self.segments.drain()

    async def serve(self, segment: int, stop: asyncio.Event) -> None:
        """Serve ``segment`` until ``stop`` is set and its queue is empty (or it is unloaded)."""
        await self.batches.serve(segment, stop)

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
        hosted = self.segments.get(packet.segment)
        if packet.model != self.model or hosted is None:
            self.counters.misrouted += len(packet.samples)
            if packet.model == self.model:  # a plan moved the segment: sent again at once
                self.segments.refuse(packet.samples, f"segment {packet.segment} is not hosted "
                                     f"on {self.cfg.node}")
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
        taken = self.segments.enqueue(packet.segment, items)
        await self.report_refused()
        return taken

    def _decode(self, frames: list[bytes]) -> list[np.ndarray | FrameError]:
        """On the decode thread: the model inputs of frames sent as the camera's bytes."""
        cpu = time.thread_time()
        out = decode_frames(frames, self.bundle.manifest.input, self.cfg.max_pixels)
        self.counters.decode_cpu_s += time.thread_time() - cpu
        return out

    # -- telling each frame's owner -------------------------------------------------------------
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
            await self.outbox.send(self._publish(self.port.topics.done(source),
                                                 report(tuple(mine)).encode(), qos))

    async def report_refused(self) -> None:
        """Tell the owners of the samples this worker could not take, so that they dispatch
        those frames again now rather than after their progress timeout. Called after each
        packet taken in and each batch passed on."""
        if refused := self.segments.take_refused():
            await self._tell_owners(refused, lambda entries: DoneReport(refused=entries), qos=1)

    async def _left(self, segment: int, node: str, items: list[Item]) -> None:
        """Count them as forwarded by the segment before, and tell each frame's owner who
        holds it now (QoS 0, best effort: without it the owner waits for its progress
        timeout if ``node`` dies holding them)."""
        if (before := self.segments.get(segment - 1)) is not None:
            before.stats.forwarded += len(items)
        await self._tell_owners(
            [(it.sample.source, Moved(task_id=it.sample.task_id, attempt=it.sample.attempt,
                                      node=node)) for it in items],
            lambda entries: DoneReport(moved=entries), qos=0)
        await self.report_refused()  # what a hand-over here could not queue, if any

    async def _completed(self, source: str, completions: list[Completion]) -> None:
        await self.outbox.send(self._report(source, completions))

    async def _report(self, source: str, completions: list[Completion]) -> None:
        await self._publish(self.port.topics.done(source),
                            DoneReport(completions=tuple(completions)).encode(), 1)
        self.counters.completions += len(completions)

    async def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            await self.port.publish(topic, payload, qos)
        except Exception as exc:
            self.counters.publish_failed += 1
            if n := self._warn.should_log():
                self.log.warning("publish_failed", topic=topic, error=str(exc), count=n)

    # -- sending --------------------------------------------------------------------------------
    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.batches.offload(fn, *args)

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

    async def _send_packet(self, topic: str, payload: bytes) -> None:
        await self._publish(topic, payload, 0)
        self.sample_queue()

    def uplink(self) -> tuple[float, float]:
        """This node's outgoing link, bytes/s (0: unknown) and round trip: as emulated where
        set (``OFFRAMP_WORKER_LINK_*``), else as measured on the connection to the broker."""
        return (self.cfg.link_bits_per_s / 8 or self.meter.bytes_per_s,
                self.cfg.link_delay_s or self.meter.rtt_s)

    def sample_queue(self) -> float:
        """How long what waits to go out takes at the link's rate now; recorded for the
        heartbeat's ``queue_s`` (:class:`~offramp.policy.links.QueuePeak`), which it returns."""
        rate = self.uplink()[0]
        now = time.monotonic()
        if rate > 0:
            self.queue_peak.add(now, self.port.unsent() / rate)
        return self.queue_peak.value(now)

    # -- the others -----------------------------------------------------------------------------
    async def observe(self, hb: Heartbeat) -> bool:
        """Another node's heartbeat: its credit, backlog and wants. A node that restarted or
        went offline takes the credit it granted, and was granted, with it; parked work is
        placed again; credit asked for is granted early. Returns whether that node serves a
        different build of this bundle (it gets no activation)."""
        peers = self.placer.peers
        if peers.update(hb):
            self.placer.forget(hb.node)
            for _, h in self.segments.items():
                h.ledger.forget(hb.node)
        await self.placer.retry()
        if hb.wants:
            self._credit_check()
        return hb.node in peers.conflicting

    def _credit_check(self) -> None:
        """A queue has room again, or a sender asks: grant now if some sender waits."""
        if self.advertiser.credit_due():
            self.port.nudge()

    def heartbeat(self, hb: Heartbeat, tcp: TcpInfo | None = None) -> Heartbeat:
        """``hb`` with this worker's side: its segments' queues and credit grants (one grant
        round), its counters, what it asks for and has sent, its link (``tcp``: the
        connection's kernel counters, when the bus has them)."""
        if tcp is not None:
            self.meter.observe(tcp.bytes_acked, tcp.busy_us, tcp.rtt_us)
        link_bps, link_rtt_s = self.uplink()
        queue_s = self.sample_queue()
        c = self.counters
        stats = {"bad_packets": c.bad_packets, "misrouted": c.misrouted, "expired": c.expired,
                 "queue_overflow": self.segments.queue_overflow, "completions": c.completions,
                 "without_credit": c.without_credit, "publish_failed": c.publish_failed,
                 "undecodable": c.undecodable, "infer_cpu_s": self.batches.infer_cpu_s,
                 "decode_cpu_s": c.decode_cpu_s, "parked": self.placer.parked(),
                 "park_expired": self.placer.park_expired}
        return replace(hb, segments=self.advertiser.loads(time.monotonic()),
                       stats={k: float(v) for k, v in stats.items()}, boot=self.boot,
                       flops_per_s=self.segments.flops_per_s(), wants=self.placer.wants(),
                       sent=self.placer.sent(), link_bps=link_bps, link_rtt_s=link_rtt_s,
                       paths={k: round(v) for k, v in self.paths.rates().items()},
                       device=self.device, queue_s=round(queue_s, 3))

    def read(self, reading: Reading) -> None:
        """This worker's metrics, for a scrape."""
        read_metrics(reading, self.segments, self.placer, self.counters, self.transfers,
                     self.uplink())

    # -- state ------------------------------------------------------------------------------------
    def busy(self) -> int:
        """Samples queued or being computed here, plus publishes not yet done."""
        return (self.batches.inflight + len(self.outbox) + len(self.link)
                + self.segments.queued())

    def idle(self) -> bool:
        return self.busy() == 0 and not self.placer.parked()

    def queued(self) -> int:
        return self.segments.queued()

    def parked(self) -> int:
        """Samples waiting for a neighbour's credit."""
        return self.placer.parked()

    async def settle(self) -> bool:
        """While draining: place parked work again. Returns False once some of it has nowhere
        to go (every host of its next segment is gone or stopping too) and nothing else is
        left here: waiting cannot help it then, its owner dispatches it again."""
        await self.placer.retry()
        return not (self.placer.stranded() and self.busy() == 0)
