"""Which segments a worker runs, while it runs: loads segments the plan gives it (session
created off the event loop), and for those it takes away, stops advertising them, lets queued
work, outstanding credit and parked work drain, waits a grace period for packets still on
their way, and only then unsubscribes and unloads. No task is lost in between.

Every task (a segment's intake and server, an unload in progress) lives in the task group
given to :meth:`Hosting.start`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from offramp.bus import Message, Subscription
from offramp.wire import Plan
from segment_worker.engine import Engine

Listen = Callable[[int], Awaitable[Subscription[Message]]]  # segment -> its packets


class Hosting:
    def __init__(self, engine: Engine, listen: Listen, *, max_bytes: int, grace_s: float,
                 log: Any) -> None:
        self.engine = engine
        self.listen = listen
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self.log = log
        self._subs: dict[int, Subscription[Message]] = {}
        self._tasks: dict[int, list[asyncio.Task[None]]] = {}
        self._unloading: dict[int, asyncio.Task[None]] = {}
        self._tearing_down: set[int] = set()  # unloads past their drain: not to be cancelled
        self._tg: asyncio.TaskGroup | None = None
        self._finishing = asyncio.Event()
        self.plan_epoch = 0

    async def load(self, segment: int, position: tuple[int, int] = (1, 1)) -> None:
        """Load ``segment`` (``position``: i of n loads under way, for readiness)."""
        loop = asyncio.get_running_loop()
        hosted = await loop.run_in_executor(None, self.engine.load, segment, position)
        self.engine.host(segment, hosted)
        self._subs[segment] = await self.listen(segment)
        if self._tg is not None:
            self._start(segment)

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        for segment in self._subs:
            self._start(segment)

    def _start(self, segment: int) -> None:
        assert self._tg is not None
        self._tasks[segment] = [self._tg.create_task(self._intake(self._subs[segment])),
                                self._tg.create_task(self.engine.serve(segment, self._finishing))]

    async def _intake(self, sub: Subscription[Message]) -> None:
        async for msg in sub:
            await self.engine.accept(msg.payload, self.max_bytes, msg.received)

    async def follow(self, plan: Plan, loadable: set[int]) -> None:
        """Make the hosted set what ``plan`` asks of this node (if it names this node and is
        newer than the last one followed)."""
        node, model = self.engine.node, self.engine.model
        if plan.epoch <= self.plan_epoch or node not in plan.nodes:
            return
        assert self._tg is not None, "Hosting.follow before Hosting.start"
        self.plan_epoch = plan.epoch
        wanted = {r.segment for r in plan.nodes[node] if r.model == model} & loadable
        current = self.engine.hosts()
        new = sorted(wanted - current)
        for segment in sorted(wanted):
            unloading = self._unloading.get(segment)
            if unloading is not None and segment not in self._tearing_down:
                del self._unloading[segment]  # still draining: take it back as it is
                unloading.cancel()
                self.engine.reclaim(segment)
                continue
            if unloading is not None:  # past the point of no return: let it go, load it again
                await asyncio.wait({unloading})
            if segment not in self.engine.hosts():
                await self.load(segment, (new.index(segment) + 1 if segment in new else 1,
                                          len(new) or 1))
        current &= self.engine.hosts()
        for segment in sorted(current - wanted):
            if segment not in self._unloading:
                self.engine.release(segment)
                self._unloading[segment] = self._tg.create_task(self._unload(segment))
        self.log.info("plan_followed", epoch=plan.epoch, reason=plan.reason,
                      hosting=sorted(wanted), releasing=sorted(self._unloading))

    async def _unload(self, segment: int) -> None:
        while True:
            while not self.engine.drained(segment):  # noqa: ASYNC110 - polls several conditions
                await asyncio.sleep(0.05)
            await asyncio.sleep(self.grace_s)  # packets already on their way
            if self.engine.drained(segment):
                break
        # The teardown: from here on a plan that wants the segment back waits for it to end
        # and loads the segment afresh (a cancel now would leave it hosted but unsubscribed).
        self._tearing_down.add(segment)
        try:
            sub = self._subs.pop(segment, None)
            for task in self._tasks.pop(segment, []):
                task.cancel()
            self.engine.unload(segment)
            if sub is not None:
                await sub.close()
        finally:
            self._tearing_down.discard(segment)
            self._unloading.pop(segment, None)
        self.log.info("segment_unloaded", segment=segment)

    def stop_intake(self) -> None:
        """Read no more packets (the worker is stopping; its senders stopped sending). The
        subscriptions go with the disconnect: no unsubscribe round trip on the way out."""
        for task in self._unloading.values():
            task.cancel()
        for segment, sub in self._subs.items():
            self._tasks[segment][0].cancel()
            sub.detach()

    def finish(self) -> None:
        self._finishing.set()
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
