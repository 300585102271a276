"""First hop of admitted frames: to the hosts of segment 1, within the credit each granted
this node (no herding, :mod:`offramp.policy.credits`), highest priority first, cheapest host
by the priority-aware backlog cost (:mod:`offramp.policy.offload`), the plan's route when
heartbeats are stale. Frames no host can take yet wait here (they are already owned, and
bounded by the in-flight limit) and go as soon as a heartbeat brings credit.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import numpy as np

from admission_controller.tracker import Task, Tracker
from offramp.bus.inbox import RateLimitedWarning
from offramp.errors import OfframpError
from offramp.node.packing import send_within
from offramp.node.peers import PeerTable
from offramp.node.tracing import AttributeValue, Tracing
from offramp.policy.admission import path_backlog
from offramp.policy.credits import Demand, SendWindow
from offramp.policy.offload import place
from offramp.wire import ActivationPacket, Heartbeat, Plan, Sample, Tensor, Want

Send = Callable[[str, bytes], Awaitable[None]]  # node, packet: to that node's segment 1
Refuse = Callable[[Task, str], Awaitable[None]]  # a task that can never be sent, and why


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    model: str
    segments: int  # of the model, for the path backlog
    node: str  # this admission-controller
    batch: int = 8  # frames per first-activation packet
    wait_s: float = 0.001  # longest wait to fill a packet
    codec: Literal["raw", "fp16", "int8"] = "raw"
    heartbeat_s: float = 0.25
    bundle: str = ""  # the identity of the bundle served: workers on another are kept apart


def _input(task: Task) -> np.ndarray | bytes:
    assert task.x is not None, "a task is submitted for dispatch once its frame is read"
    return task.x


def _size(x: np.ndarray | bytes) -> int:
    return len(x) if isinstance(x, bytes) else x.nbytes


class Dispatcher:
    def __init__(self, cfg: DispatchConfig, *, tracker: Tracker, send: Send,
                 nudge: Callable[[], None], log: Any, tracing: Tracing | None = None,
                 max_payload: Callable[[str], int] = lambda node: 0,
                 refuse: Refuse | None = None) -> None:
        self.cfg = cfg
        self.tracing = tracing
        self.model = cfg.model
        self.tracker = tracker
        self.send = send
        self.max_payload = max_payload  # the largest packet to a node the bus takes (0: any)
        self.refuse = refuse
        self.split = 0  # batches sent as several packets: one would not fit the broker
        self._split_said = RateLimitedWarning(10.0)
        self._too_large_said = RateLimitedWarning(1.0)
        self.nudge = nudge  # this node's heartbeat, early: it carries a new request
        self.log = log
        self.boot = time.time()
        self.peers = PeerTable(cfg.node, cfg.bundle)
        self.window = SendWindow(cfg.node, self.boot)
        self.plan: Plan | None = None
        self.pending: dict[float, OrderedDict[str, Task]] = {}  # priority -> FIFO
        self._event = asyncio.Event()
        self._demand: Demand[float] = Demand(cfg.heartbeat_s, time.monotonic())
        self.stale_after_s = 3 * cfg.heartbeat_s

    def waiting(self, priority: float | None = None) -> int:
        """Frames waiting here for credit (of ``priority`` or higher)."""
        return sum(len(q) for p, q in self.pending.items() if priority is None or p >= priority)

    def submit(self, tasks: list[Task]) -> None:
        now = time.time()
        for t in tasks:
            t.queued_at = now
            queue = self.pending.setdefault(t.priority, OrderedDict())
            if t.task_id not in queue:
                queue[t.task_id] = t
                self._demand.add(t.priority)
        self._event.set()

    def withdraw(self) -> list[Task]:
        """Every frame waiting here, taken out (oldest first within a priority), for an
        answer without a worker."""
        tasks = [t for q in self.pending.values() for t in q.values() if t.task_id in self.tracker]
        self.pending.clear()
        return tasks

    def wake(self) -> None:
        self._event.set()

    def observe(self, hb: Heartbeat) -> bool:
        """A worker's heartbeat: its credit, backlog and the bundle it serves. Returns True
        when the worker went offline: the credit it granted goes, and what it held is the
        caller's to send again."""
        gone = self.peers.update(hb)
        if gone:
            self.window.forget(hb.node)
        self.wake()
        return gone

    def apply_plan(self, plan: Plan) -> None:
        """The plan's routes: the fallback when heartbeats are stale."""
        self.plan = plan

    def silent(self, node: str) -> bool:
        """Whether ``node``'s heartbeat has not come for three periods."""
        return self.peers.silent(node, self.stale_after_s)

    def worker_bundles(self, fresh: bool = True) -> dict[str, str]:
        """The bundle each worker serves: of those heard from lately, or (``fresh`` False) of
        every worker seen since this one started."""
        return self.peers.bundles("worker", self.stale_after_s if fresh else float("inf"))

    async def run(self) -> None:
        wait = self.cfg.wait_s
        while True:
            await self._event.wait()
            self._event.clear()
            if wait and 0 < self.waiting() < self.cfg.batch:
                await asyncio.sleep(wait)
            await self.dispatch()

    async def dispatch(self) -> None:
        """Highest priority first, oldest first within a priority, as far as credit goes.
        Costs O(what is sent), not O(what waits): it runs on every frame and heartbeat."""
        for prio in sorted(self.pending, reverse=True):
            queue = self.pending[prio]
            cands = self.peers.candidates(self.model, 1, priority=prio, window=self.window)
            credit = sum(c.credit for c in cands)
            group: list[Task] = []
            while queue and len(group) < credit:
                _, task = queue.popitem(last=False)
                if task.task_id in self.tracker:  # else answered or expired meanwhile
                    group.append(task)
            if not queue:
                del self.pending[prio]
            if not group:
                continue
            fallback = None
            if self.plan is not None:
                fallback = self.plan.routes.get(group[0].source, {}).get(1)
            placement = place(cands, len(group), _size(_input(group[0])),
                              stale_after_s=self.stale_after_s, fallback=fallback)
            start = 0
            for node, n in placement.parts:
                chunk = group[start:start + n]
                start += n
                for i in range(0, n, self.cfg.batch):
                    await self._send(node, chunk[i:i + self.cfg.batch])
            for task in reversed(group[start:]):  # no fresh host could take them: back in front
                self.pending.setdefault(prio, OrderedDict())[task.task_id] = task
                self.pending[prio].move_to_end(task.task_id, last=False)
        if any(self._demand.untold(p, len(q)) for p, q in self.pending.items()):
            self.nudge()  # the hosts of segment 1 do not know of these frames yet

    async def _send(self, node: str, tasks: list[Task]) -> None:
        now = time.time()
        hb = self.peers.heartbeat(node)
        for t in tasks:
            self.tracker.dispatched(t, now, node)
        self.window.spend(node, hb.boot if hb else 0.0, self.model, 1, len(tasks))

        async def to_node(part: Sequence[Task], payload: bytes) -> None:
            await self.send(node, payload)

        cap = self.max_payload(node)
        try:
            packed = await send_within(tasks, cap, partial(self._packet, now), to_node)
        except OfframpError as exc:  # the sweeper dispatches them again
            self.log.warning("dispatch_failed", error=str(exc), tasks=len(tasks))
        else:
            self.split += packed.split
            if packed.split and (n := self._split_said.should_log()):
                self.log.info("batch_split", to=node, samples=len(tasks), limit=cap, count=n)
            for task, size in packed.too_large:  # never fits: answered now, not retried
                why = (f"the frame's input is {size} bytes as a packet, over the {cap} bytes "
                       "the broker takes (max_packet_size, OFFRAMP_MAX_MESSAGE_BYTES)")
                if n := self._too_large_said.should_log():
                    self.log.error("frame_too_large", task=task.task_id, bytes=size, limit=cap,
                                   count=n)
                if self.refuse is not None:
                    await self.refuse(task, why)
        if self.tracing is not None and self.tracing.enabled:
            sent = time.time()
            for t in tasks:
                attrs: dict[str, AttributeValue] = {"offramp.node": node,
                                                    "offramp.attempt": t.attempt}
                self.tracing.record(t.trace, "queue", t.queued_at or now, now, attrs)
                self.tracing.record(t.trace, "dispatch", now, sent, {**attrs,
                                                                    "offramp.batch": len(tasks)})

    async def _packet(self, now: float, tasks: Sequence[Task]) -> bytes:
        samples = tuple(Sample(task_id=t.task_id, source=t.source, frame_id=t.frame_id,
                               priority=t.priority, created=t.created, deadline=t.deadline,
                               attempt=t.attempt, trace=t.traceparent) for t in tasks)
        xs = [_input(t) for t in tasks]
        frames = [x for x in xs if isinstance(x, bytes)]
        if frames:  # the camera's bytes, decoded by the worker
            assert len(frames) == len(xs), "one first hop for every frame of an admission"
            return ActivationPacket(model=self.model, segment=1, samples=samples,
                                    inputs=tuple(frames), sent=now, sender=self.cfg.node,
                                    sender_boot=self.boot).encode()
        x = np.stack([x for x in xs if not isinstance(x, bytes)])
        return ActivationPacket(model=self.model, segment=1, samples=samples,
                                tensor=Tensor.encode(x, self.cfg.codec), embedding=None, sent=now,
                                sender=self.cfg.node, sender_boot=self.boot).encode()

    def path_backlog(self, priority: float) -> float:
        """Q_path of a source of ``priority``: least backlog per segment along the model, plus
        what waits here for credit ahead of it (spread over the hosts of segment 1)."""
        per_segment = self.peers.segment_backlogs(self.model, self.cfg.segments,
                                                  self.stale_after_s, priority=priority)
        first = per_segment[0]
        waiting = self.waiting(priority)
        if waiting and first:
            per = min(first) or 0.001
            per_segment[0] = [q + waiting * per / len(first) for q in first]
        return path_backlog(per_segment)

    def heartbeat(self, hb: Heartbeat) -> Heartbeat:
        counts = self._demand.wants({p: len(q) for p, q in self.pending.items()},
                                    time.monotonic())
        wants = tuple(Want(model=self.model, segment=1, priority=p, count=n) for p, n in counts.items())
        return replace(hb, boot=self.boot, wants=wants, sent=self.window.report())
