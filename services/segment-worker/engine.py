"""The worker's data path: queue -> micro-batch -> segment (off the event loop) -> per-sample
exit -> completion, or on to the next segment (in memory when local, over the bus otherwise)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import structlog

from offramp.bundle import Bundle
from offramp.errors import WireError
from offramp.inbox import RateLimitedWarning
from offramp.outbox import Outbox
from offramp.peers import PeerTable
from offramp.policy.exits import decide
from offramp.policy.offload import Candidate, Choice, choose
from offramp.runtime import SegmentOutput, SegmentRunner
from offramp.services.segment_worker.queue import Item, SegmentQueue
from offramp.topics import Topics
from offramp.wire import (
    ActivationPacket,
    Completion,
    ExitPolicy,
    Hop,
    Sample,
    SegmentLoad,
    Tensor,
)

Publish = Callable[[str, bytes, int], Awaitable[None]]


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
        self.service_s = per if self.batches == 0 else 0.8 * self.service_s + 0.2 * per
        self.batches += 1
        self.samples += batch


@dataclass
class EngineConfig:
    node: str
    segments: tuple[int, ...]
    batch_max: int = 8
    batch_wait_s: float = 0.002
    queue_max: int = 512
    codec: Literal["raw", "fp16", "int8"] = "raw"
    device: str = "cpu"
    threads: int = 1
    offload_margin_s: float = 0.002
    stale_after_s: float = 0.75
    slowdown: float = 1.0


@dataclass
class Counters:
    bad_packets: int = 0
    misrouted: int = 0
    expired: int = 0
    queue_overflow: int = 0
    dropped_unroutable: int = 0
    completions: int = 0


class Engine:
    def __init__(self, bundle: Bundle, cfg: EngineConfig, topics: Topics, peers: PeerTable,
                 publish: Publish) -> None:
        self.bundle = bundle
        self.model = bundle.name
        self.cfg = cfg
        self.topics = topics
        self.peers = peers
        self.publish = publish
        self.policy: ExitPolicy | None = None
        self.runners = {s: SegmentRunner(bundle, s, device=cfg.device, threads=cfg.threads)
                        for s in cfg.segments}
        self.queues = {s: SegmentQueue(cfg.queue_max) for s in cfg.segments}
        self.stats = {s: SegmentStats() for s in cfg.segments}
        self.counters = Counters()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{cfg.node}")
        self.outbox = Outbox(1024)
        self.log = structlog.get_logger("offramp.worker").bind(node=cfg.node, model=self.model)
        self._warn = RateLimitedWarning()
        self._inflight = 0

    @property
    def providers(self) -> list[str]:
        providers: list[str] = next(iter(self.runners.values())).providers
        return providers

    # -- intake ---------------------------------------------------------------------------------
    def accept(self, payload: bytes, max_bytes: int) -> int:
        """Decode one packet and queue its samples; bad packets are counted, never raised."""
        try:
            packet = ActivationPacket.decode(payload, max_bytes=max_bytes)
            x = packet.tensor.to_numpy()
            prev = packet.embedding.to_numpy() if packet.embedding is not None else None
        except WireError as exc:
            self.counters.bad_packets += 1
            if n := self._warn.should_log():
                self.log.warning("bad_packet", error=str(exc), count=n)
            return 0
        if packet.model != self.model or packet.segment not in self.queues:
            self.counters.misrouted += len(packet.samples)
            return 0
        now = time.time()
        items = []
        for i, sample in enumerate(packet.samples):
            if sample.deadline is not None and sample.deadline < now:
                self.counters.expired += 1  # the admission-controller answers it 'expired'
                continue
            items.append(Item(sample, x[i], None if prev is None else prev[i], now))
        return self._enqueue(packet.segment, items)

    def _enqueue(self, segment: int, items: list[Item]) -> int:
        rejected = self.queues[segment].push(items)
        if rejected:
            self.counters.queue_overflow += len(rejected)
            self.log.warning("queue_overflow", segment=segment, dropped=len(rejected),
                             bound=self.cfg.queue_max)
        return len(items) - len(rejected)

    # -- serving --------------------------------------------------------------------------------
    async def serve(self, segment: int, stop: asyncio.Event) -> None:
        queue = self.queues[segment]
        while not (stop.is_set() and len(queue) == 0):
            items = await queue.batch(self.cfg.batch_max, self.cfg.batch_wait_s)
            self._inflight += len(items)
            try:
                await self._run_batch(segment, items)
            finally:
                self._inflight -= len(items)

    def idle(self) -> bool:
        return (self._inflight == 0 and len(self.outbox) == 0
                and all(len(q) == 0 for q in self.queues.values()))

    def _infer(self, segment: int, x: np.ndarray) -> tuple[SegmentOutput, float, float]:
        started = time.time()
        out = self.runners[segment].run(x)
        if self.cfg.slowdown > 1.0:  # emulated slower node (tests, benchmarks)
            time.sleep((time.time() - started) * (self.cfg.slowdown - 1.0))
        return out, started, time.time()

    async def _run_batch(self, segment: int, items: list[Item]) -> None:
        x = np.stack([it.x for it in items])
        loop = asyncio.get_running_loop()
        out, started, finished = await loop.run_in_executor(self.executor, self._infer, segment, x)
        self.stats[segment].record(len(items), finished - started)
        samples = [replace(it.sample, hops=(*it.sample.hops,
                                            Hop(self.cfg.node, segment, it.arrived, started,
                                                finished))) for it in items]
        last = segment == self.bundle.num_segments
        prevs = [it.prev for it in items if it.prev is not None]
        prev = np.stack(prevs) if len(prevs) == len(items) else None
        route = None
        if out.activation is not None:
            route = self._route(segment + 1, out.activation[0].nbytes * len(items))
        deadlines = np.array([s.deadline if s.deadline is not None else math.nan
                              for s in samples])
        policy = self.policy
        threshold = None
        if policy is not None and not last and segment <= len(policy.thresholds):
            threshold = policy.thresholds[segment - 1]
        d = decide(policy.criterion if policy else "confidence", threshold, out.logits,
                   out.embedding, prev, last=last, deadlines=deadlines, now=finished,
                   time_to_next_s=route.cost_s if route else 0.0)
        done = [i for i in range(len(items)) if d.exits[i]]
        stay = [i for i in range(len(items)) if not d.exits[i]]
        thresholds = tuple(policy.thresholds) if policy else ()
        for i in done:
            await self.outbox.send(self._complete(samples[i], int(d.labels[i]),
                                                  float(d.confidence[i]), segment, d.reasons[i],
                                                  thresholds))
        self.stats[segment].exited += len(done)
        if stay and out.activation is not None:
            await self._forward(segment + 1, [samples[i] for i in stay],
                                out.activation[stay], out.embedding[stay], route)

    async def _complete(self, sample: Sample, label: int, confidence: float, segment: int,
                        reason: str, thresholds: tuple[float, ...]) -> None:
        done = Completion(sample.task_id, sample.source, sample.frame_id, sample.attempt, label,
                          confidence, segment, reason, self.cfg.node, time.time(),  # type: ignore[arg-type]
                          sample.hops, thresholds, sample.created)
        await self.publish(self.topics.done(sample.source), done.encode(), 1)
        self.counters.completions += 1

    # -- routing --------------------------------------------------------------------------------
    def _route(self, segment: int, nbytes: int) -> Choice | None:
        candidates = self.peers.candidates(self.model, segment)
        if segment in self.queues:
            st = self.stats[segment]
            candidates.append(Candidate(self.cfg.node, len(self.queues[segment]) * st.service_s,
                                        st.service_s, local=True))
        return choose(candidates, nbytes, margin_s=self.cfg.offload_margin_s,
                      stale_after_s=self.cfg.stale_after_s)

    async def _forward(self, segment: int, samples: list[Sample], act: np.ndarray,
                       emb: np.ndarray, route: Choice | None) -> None:
        node = route.node if route is not None else None
        if node is None:
            self.counters.dropped_unroutable += len(samples)
            if n := self._warn.should_log():
                self.log.warning("no_worker_for_segment", segment=segment, dropped=n)
            return
        if node == self.cfg.node:
            now = time.time()
            items = [Item(s, act[i], emb[i], now) for i, s in enumerate(samples)]
            self.stats[segment].handed_over += self._enqueue(segment, items)
            return
        packet = ActivationPacket(self.model, segment, tuple(samples),
                                  Tensor.encode(np.ascontiguousarray(act), self.cfg.codec),
                                  Tensor.encode(np.ascontiguousarray(emb), "fp16"), time.time())
        await self.publish(self.topics.act(self.model, segment, node), packet.encode(), 0)
        self.stats[segment - 1].forwarded += len(samples)

    # -- state ----------------------------------------------------------------------------------
    def loads(self) -> tuple[SegmentLoad, ...]:
        out = []
        for seg, q in self.queues.items():
            st = self.stats[seg]
            mean = st.samples / st.batches if st.batches else 0.0
            rate = 1.0 / st.service_s if st.service_s > 0 else 0.0
            out.append(SegmentLoad(self.model, seg, len(q), len(q) * st.service_s, rate, mean,
                                   st.exited, st.forwarded))
        return tuple(out)
