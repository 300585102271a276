"""Where a sample's next task goes, from a worker: this node (in memory) or a neighbour (one
packet per destination), chosen by the priority-aware backlog cost within credit
(:mod:`offramp.policy.offload`, :mod:`offramp.policy.credits`), with the plan's route as the
fallback when heartbeats are stale. What nobody can take now is parked (bounded) and placed
again when credit arrives; a full parking stops the segment before it (backpressure).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import structlog

from offramp.bus.inbox import RateLimitedWarning
from offramp.model.resident import Activation, on_host
from offramp.node.packing import send_within
from offramp.node.peers import PeerTable
from offramp.policy.credits import Demand, SendWindow
from offramp.policy.links import paced
from offramp.policy.offload import Candidate, choose, place
from offramp.wire import ActivationPacket, Plan, SentCount, Tensor, Want
from segment_worker.queue import Item
from segment_worker.settings import EngineConfig

Transmit = Callable[[str, bytes], Awaitable[None]]  # topic, payload: onto this node's link
Uplink = Callable[[], tuple[float, float]]  # this node's link: bytes/s (0: unknown), round trip
# segment, to node, activation -> the tensor and the name of the codec that made it
Encode = Callable[[int, str, np.ndarray], Awaitable[tuple[Tensor, str]]]
ActTopic = Callable[[int, str], str]  # segment, node -> the topic of that node's packets
# cut, link bytes/s -> (wire bytes per raw byte, codec seconds per raw byte) by its codec there
Wire = Callable[[int, float], tuple[float, float]]
OnHost = Callable[[list[Activation]], Awaitable[np.ndarray]]  # queued activations -> one array
Left = Callable[[int, str, list[Item]], Awaitable[None]]  # segment, node, the items sent there


async def _stack(xs: list[Activation]) -> np.ndarray:
    return on_host(xs)


async def _left(segment: int, node: str, items: list[Item]) -> None:
    return None


async def _raw(segment: int, node: str, x: np.ndarray) -> tuple[Tensor, str]:
    return Tensor.encode(x), "raw"


class Stages(Protocol):
    """What the placer needs of the segments this node hosts (the worker's hosted-segment
    table, :class:`~segment_worker.segments.Segments`, provides it)."""

    def local_candidate(self, segment: int, priority: float) -> Candidate | None:
        """This node as a candidate for ``segment``, or None when it does not take it now."""

    def hand_over(self, segment: int, items: list[Item]) -> None:
        """Queue ``items`` for ``segment`` here, in memory."""


@dataclass(frozen=True)
class Outlet:
    """How this node's packets leave it: the link, the codecs and the bus's limits, as the
    engine provides them (defaults: an unmeasured link, raw tensors, no limit)."""

    transmit: Transmit  # onto this node's link
    act_topic: ActTopic
    nudge: Callable[[], None] = lambda: None  # this node's heartbeat, early: a new request in it
    uplink: Uplink = lambda: (0.0, 0.0)
    encode: Encode = _raw
    wire: Wire = lambda cut, rate: (1.0, 0.0)
    max_payload: Callable[[str], int] = lambda topic: 0  # what the bus takes per message (0: any)
    on_host: OnHost = _stack  # device rows come to the host once, for a packet
    unsent: Callable[[], int] = lambda: 0  # bytes published and not yet delivered
    left: Left = _left  # after each packet: its items went to that node (owners are told)


class Placer:
    def __init__(self, cfg: EngineConfig, *, model: str, boot: float, peers: PeerTable,
                 stages: Stages, out: Outlet) -> None:
        self.cfg = cfg
        self.model = model
        self.boot = boot
        self.peers = peers
        self.stages = stages
        self.out = out
        self.window = SendWindow(cfg.node, boot)
        self.plan: Plan | None = None
        self._parked: dict[int, list[Item]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._demand: Demand[tuple[int, float]] = Demand(self.cfg.heartbeat_s, time.monotonic())
        self.park_expired = 0
        self.by_codec: Counter[str] = Counter()  # samples sent to other nodes, by codec
        self.split = 0  # batches sent as several packets: one would not fit the broker
        self.too_large = 0  # samples whose activation alone does not fit
        self.log = structlog.get_logger("offramp.worker").bind(node=cfg.node)
        self._split_said = RateLimitedWarning(10.0)
        self._too_large_said = RateLimitedWarning(1.0)

    # -- parking ----------------------------------------------------------------------------------
    def stranded(self) -> bool:
        """Whether some parked work has nowhere to go: no fresh host of its segment, here or
        elsewhere (they are all gone or draining). Waiting for credit cannot help it then."""
        for seg, items in self._parked.items():
            if items and not any(c.local or c.age_s <= self.cfg.stale_after_s
                                 for c in self._candidates(seg, 0.0, 1)):
                return True
        return False

    def parked(self, segment: int | None = None) -> int:
        if segment is not None:
            return len(self._parked.get(segment, ()))
        return sum(len(v) for v in self._parked.values())

    async def room(self, segment: int) -> None:
        while self.parked(segment) >= self.cfg.queue_max or self._parked_for_link(segment):
            self._room.clear()
            await self._room.wait()

    def _paced_rate(self) -> float:
        """The link rate sends are paced by, bytes/s (0: pacing is off or the link is not
        known yet)."""
        return self.out.uplink()[0] if self.cfg.send_queue_s else 0.0

    def _send_budget(self) -> float:
        """Bytes the send queue may take now (``send_queue_s`` of the measured link, less
        what waits in it); infinite where sends are not paced."""
        rate = self._paced_rate()
        return self.cfg.send_queue_s * rate - self.out.unsent() if rate > 0 else float("inf")

    def _parked_for_link(self, segment: int) -> bool:
        """Whether the work parked for ``segment`` needs more than half the park timeout of
        the link (paced sends): the segment before it waits, so none of it times out."""
        rate = self._paced_rate()
        if rate <= 0:
            return False
        waiting = sum(it.x.nbytes for it in self._parked.get(segment, ()))
        return waiting / rate > self.cfg.park_timeout_s / 2

    async def retry(self) -> None:
        """Place parked work again (credit may have arrived); drop what waited too long."""
        if not self._parked:
            return
        now = time.time()
        for seg in list(self._parked):
            items = self._parked.pop(seg)
            fresh = [it for it in items if now - it.arrived < self.cfg.park_timeout_s and
                     (it.sample.deadline is None or it.sample.deadline > now)]
            self.park_expired += len(items) - len(fresh)  # their owner re-dispatches them
            if fresh:
                await self._place(seg, fresh)
        self._room.set()

    # -- placing ----------------------------------------------------------------------------------
    def _candidates(self, segment: int, priority: float, count: int) -> list[Candidate]:
        link_bps, rtt_s = self.out.uplink()
        cands = [self._by_codec(c, segment - 1) for c in self.peers.candidates(
            self.model, segment, count, priority=priority, window=self.window,
            link_bps=link_bps, rtt_s=rtt_s)]
        local = self.stages.local_candidate(segment, priority)
        return [*cands, local] if local is not None else cands

    def _by_codec(self, c: Candidate, cut: int) -> Candidate:
        """``c`` with what the codec chosen for its link does to the transfer."""
        ratio, codec_s = self.out.wire(cut, c.link_bytes_per_s)
        return replace(c, wire_ratio=ratio, codec_s_per_byte=codec_s)

    def estimate(self, segment: int, nbytes: int) -> float:
        """Expected time to the next exit for a batch of ``nbytes`` (the deadline rule)."""
        choice = choose(self._candidates(segment, 0.0, 1), nbytes,
                        margin_s=self.cfg.offload_margin_s, stale_after_s=self.cfg.stale_after_s)
        return choice.cost_s if choice else 0.0

    def stays_here(self, segment: int, priority: float, count: int, nbytes_per_sample: int) -> bool:
        """Whether ``count`` samples of ``priority`` would all be placed on this node for
        ``segment`` now (no neighbour cheaper within its credit, nothing parked before them)."""
        if self.parked(segment):
            return False
        placement = place(self._candidates(segment, priority, count), count, nbytes_per_sample,
                          margin_s=self.cfg.offload_margin_s,
                          stale_after_s=self.cfg.stale_after_s)
        return placement.parts == ((self.cfg.node, count),)

    async def forward(self, segment: int, items: list[Item]) -> None:
        for it in items:
            self._demand.add((segment, it.sample.priority))
        await self._place(segment, items)

    async def _place(self, segment: int, items: list[Item]) -> None:
        by_prio: dict[float, list[Item]] = {}
        for it in items:
            by_prio.setdefault(it.sample.priority, []).append(it)
        for prio in sorted(by_prio, reverse=True):
            group = by_prio[prio]
            fallback = None
            if self.plan is not None:
                fallback = self.plan.routes.get(group[0].sample.source, {}).get(segment)
            per_sample = group[0].x.nbytes
            placement = place(self._candidates(segment, prio, len(group)), len(group), per_sample,
                              margin_s=self.cfg.offload_margin_s,
                              stale_after_s=self.cfg.stale_after_s, fallback=fallback)
            parts = list(placement.parts)
            budget = self._send_budget()
            if budget != float("inf"):  # what the link takes soon; the rest waits parked
                ratio = self.out.wire(segment - 1, self.out.uplink()[0])[0]
                parts = paced(parts, self.cfg.node, per_sample * ratio, budget)
            for node, n in parts:
                if node != self.cfg.node and n:  # before any await: a concurrent placement
                    hb = self.peers.heartbeat(node)  # must not count on the same credit
                    self.window.spend(node, hb.boot if hb is not None else 0.0, self.model,
                                      segment, n)
            start, held = 0, []
            for (node, n), (_, full) in zip(parts, placement.parts, strict=True):
                if n:
                    await self._send(segment, node, group[start:start + n])
                held += group[start + n:start + full]
                start += full
            held += group[start:]
            if held:
                parked = self._parked.setdefault(segment, [])
                parked.extend(held)
                waiting = sum(1 for it in parked if it.sample.priority == prio)
                if self._demand.untold((segment, prio), waiting):
                    self.out.nudge()  # the hosts of ``segment`` do not know of this yet

    async def _send(self, segment: int, node: str, items: list[Item]) -> None:
        if node == self.cfg.node:
            now = time.time()
            for it in items:
                it.arrived = it.sent = now
            self.stages.hand_over(segment, items)
            return
        topic = self.out.act_topic(segment, node)
        codecs: list[str] = []

        async def pack(part: Sequence[Item]) -> bytes:
            payload, codec = await self._packet(segment, node, part)
            codecs.append(codec)
            return payload

        async def send(part: Sequence[Item], payload: bytes) -> None:
            await self.out.transmit(topic, payload)
            self.by_codec[codecs[-1]] += len(part)  # a part is sent right after it is packed
            await self.out.left(segment, node, list(part))

        cap = self.out.max_payload(topic)
        packed = await send_within(items, cap, pack, send)
        self.split += packed.split
        if packed.split and (n := self._split_said.should_log()):
            self.log.info("batch_split", segment=segment, to=node, samples=len(items),
                          limit=cap, count=n)
        for it, size in packed.too_large:
            self.too_large += 1
            if n := self._too_large_said.should_log():
                self.log.error("activation_too_large", segment=segment, to=node, bytes=size,
                               limit=cap, task=it.sample.task_id, count=n,
                               hint="raise the broker's max_packet_size and "
                                    "OFFRAMP_MAX_MESSAGE_BYTES, or a codec that sends less")

    async def _packet(self, segment: int, node: str, items: Sequence[Item]) -> tuple[bytes, str]:
        act = await self.out.on_host([it.x for it in items])
        emb = np.stack([it.prev for it in items if it.prev is not None]) \
            if all(it.prev is not None for it in items) else None
        tensor, codec = await self.out.encode(segment, node, act)
        packet = ActivationPacket(model=self.model, segment=segment,
                                  samples=tuple(it.sample for it in items), tensor=tensor,
                                  embedding=None if emb is None else Tensor.encode(emb, "fp16"),
                                  sent=time.time(), sender=self.cfg.node, sender_boot=self.boot)
        return packet.encode(), codec

    # -- what this node tells the others ----------------------------------------------------------
    def wants(self) -> tuple[Want, ...]:
        """What this node asks each segment's hosts for, per priority (:class:`Demand`)."""
        waiting: Counter[tuple[int, float]] = Counter()
        for seg, items in self._parked.items():
            for it in items:
                waiting[(seg, it.sample.priority)] += 1
        counts = self._demand.wants(waiting, time.monotonic())
        return tuple(Want(model=self.model, segment=seg, priority=prio, count=n)
                     for (seg, prio), n in counts.items())

    def sent(self) -> tuple[SentCount, ...]:
        return self.window.report()

    def forget(self, node: str) -> None:
        """``node`` went offline: the credit it granted this node is gone."""
        self.window.forget(node)
