"""The group's ingest session, held while this admission-controller is the active one.

Frames come on a connection of their own (client id ``offramp-ingest-<group>``), with manual
acknowledgement and a receive maximum (:mod:`admission_controller.ingest`). The session
persists at the broker: whoever connects with its client id next gets every frame received
here and not yet acknowledged (answered). :mod:`admission_controller.leadership` decides when
this member takes it and gives it up; :meth:`IngestSession.hold` follows that decision.

On SIGTERM the active member stops taking frames, lets those in flight finish for
``OFFRAMP_ADMISSION_DRAIN_S``, and then leaves the rest unacknowledged to a standby that is
there to take the session, or answers them ``error`` when none is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from admission_controller.ingest import Ingest, Replies
from admission_controller.leadership import Leadership
from admission_controller.tracker import Tracker
from offramp.bus import Message, MessageBus, Subscription, Topics

TICK_S = 0.05  # how often a standing-by member looks whether it should take the session
ACTIVE_TICK_S = 1.0  # ... and the active one, besides on every heartbeat of another member


class IngestSession:
    def __init__(self, make_bus: Callable[[], MessageBus], *, ingest: Ingest, replies: Replies,
                 tracker: Tracker, leadership: Leadership, topics: Topics, queue: int,
                 log: Any) -> None:
        self.make_bus = make_bus
        self.ingest = ingest
        self.results = replies.results
        self.refusals = replies.refusals
        self.tracker = tracker
        self.leadership = leadership
        self.topics = topics
        self.queue = queue
        self.log = log
        self.bus: MessageBus | None = None
        self.sub: Subscription[Message] | None = None
        self.handed_over = 0  # frames left to the standby at the last stop
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._heard = asyncio.Event()  # another member's heartbeat came
        self._role = asyncio.Event()  # this member took or gave the session

    def heard(self) -> None:
        """Another member's heartbeat was observed: the leadership may decide now."""
        self._heard.set()

    async def until(self, *, active: bool) -> None:
        """Return once this member holds the session (``active``) or does not."""
        while self.leadership.active != active:
            self._role.clear()
            await self._role.wait()

    def ack(self, msg: Message) -> None:
        if self.bus is not None:
            self.bus.ack(msg)

    async def hold(self, tg: asyncio.TaskGroup) -> None:
        """Take and give the session as the leadership decides, until cancelled; then leave
        (see :meth:`leave`). Runs as one task: it opens and closes the ingest connection."""
        try:
            while True:
                self._heard.clear()
                action = self.leadership.step(time.monotonic(), time.time())
                if action == "take":
                    await self._take(tg)
                elif action == "give":
                    await self._give()
                if action is not None:
                    self._role.set()
                await self._next_step()
        finally:
            await self.leave()

    async def _next_step(self) -> None:
        """Wait for the next leadership step. Standing by, the clock alone can make it take
        the session (no other member heard active for a while): a short tick. Active, only
        another member's heartbeat can make it give the session up: that heartbeat, or a
        slow tick, so that an idle active member does not wake 20 times a second."""
        if not self.leadership.active:
            await asyncio.sleep(TICK_S)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACTIVE_TICK_S):
                await self._heard.wait()

    async def _take(self, tg: asyncio.TaskGroup) -> None:
        self.bus = await self._stack.enter_async_context(self.make_bus())
        self.sub = await self.bus.subscribe(self.topics.ingest_all(), qos=1, maxsize=self.queue,
                                            overflow="drop-newest",
                                            on_drop=self.ingest.on_overflow)
        self._tasks = [tg.create_task(self.ingest.run(self.sub)),
                       tg.create_task(self.ingest.answer_overflow()),
                       tg.create_task(self.refusals.run())]
        self.log.info("ingest_session_taken", client_id=self.bus.client_id)

    async def _give(self) -> None:
        """Another member holds the session now: its frames are that member's to answer. What
        this one still tracks is forgotten unanswered (the broker redelivered it there)."""
        if self.sub is not None:
            self.sub.detach()
        forgotten = len(self.tracker.drain())
        self.ingest.forget()
        await self._close()
        self.log.warning("ingest_session_given_up", forgotten=forgotten)

    def pause(self) -> None:
        """Take no more frames (a stop begins): the broker keeps the rest, unacknowledged."""
        self.ingest.stopping.set()
        if self.sub is not None:
            self.sub.detach()
        for task in self._tasks[:1]:
            task.cancel()

    async def drain(self, seconds: float) -> None:
        """Let the frames at the workers finish, for up to ``seconds`` (the ones not sent to a
        worker yet are not waited for)."""
        deadline = time.monotonic() + seconds
        while self.tracker.at_workers() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(TICK_S)

    async def leave(self) -> None:
        """Stop holding the session: hand what is left to the standby that is there to take
        it (unanswered, unacknowledged), or answer it ``error`` when there is none."""
        if self.bus is None:
            return
        self.pause()
        await self.refusals.flush()  # refused already: answered, not left to anyone
        left = len(self.tracker) + len(self.ingest.in_hand) + (len(self.sub.inbox)
                                                               if self.sub else 0)
        if left and self.leadership.standby_alive(time.monotonic()):
            self.handed_over = left
            self.tracker.drain()
            self.log.warning("frames_left_to_standby", frames=left)
        else:
            for task in self.tracker.drain():
                await self.results.answer(task.owed(), "error",
                                          error="admission-controller stopped")
            if self.sub is not None:
                await self.ingest.stop(self.sub)
        await self.results.outbox.flush(5.0)  # answers out, then acknowledged: before closing
        await self._close()

    async def _close(self) -> None:
        self.leadership.active_since = 0.0
        self._role.set()
        for task in self._tasks:
            task.cancel()
        await self._stack.aclose()
        self.bus, self.sub, self._tasks = None, None, []
