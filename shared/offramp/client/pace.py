"""Following the rate the admission-controller takes a source's frames at
(``control/pace/<source>``, docs/wire.md "Pace"): a camera asks :meth:`PaceFollower.take`
before it sends a frame, and skips the frame at the camera when the answer is no, instead of
spending its uplink on a frame that would be answered ``dropped``."""

from __future__ import annotations

import asyncio
import time

from offramp.bus import Message, MessageBus, Subscription, Topics
from offramp.errors import WireError
from offramp.policy.admission import TokenBucket
from offramp.wire import Pace

BURST_S = 0.1  # frames a follower may send at once, in seconds of the pace


class PaceFollower:
    """The pace of one source and a token bucket at that rate. With no pace told (or one
    that no longer holds: its controller stopped saying it) every frame may go. ``share``: the
    part of the source's frames this sender sends, where several send for one source."""

    def __init__(self, burst_s: float = BURST_S, share: float = 1.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share {share}: a fraction in (0, 1]")
        self.burst_s = burst_s
        self.share = share
        self.pace: Pace | None = None
        self._bucket: TokenBucket | None = None
        self.told = 0  # paces received
        self.undecodable = 0
        self.skipped = 0  # frames :meth:`take` said no to
        self.sent = 0  # ... and yes to

    @property
    def rate_hz(self) -> float | None:
        """The rate followed now (None: none is told, every frame may go)."""
        pace = self.pace
        return pace.rate_hz * self.share if pace is not None and pace.holds(time.time()) \
            else None

    def tell(self, pace: Pace | None) -> None:
        """A pace received (None: withdrawn)."""
        self.pace = pace
        self.told += pace is not None
        if pace is None:
            self._bucket = None
        elif self._bucket is None:
            self._bucket = TokenBucket(pace.rate_hz * self.share, self.burst_s, time.monotonic())
        else:
            self._bucket.rate = pace.rate_hz * self.share

    def read(self, msg: Message) -> None:
        """A message of ``control/pace/<source>``: a pace, or empty (withdrawn)."""
        if not msg.payload:
            self.tell(None)
            return
        try:
            self.tell(Pace.from_json(msg.payload))
        except WireError:
            self.undecodable += 1

    def take(self, now: float | None = None) -> bool:
        """Whether a frame sent now fits the pace (counted either way)."""
        ok = self._bucket is None or self.rate_hz is None or \
            self._bucket.take(time.monotonic() if now is None else now)
        if ok:
            self.sent += 1
        else:
            self.skipped += 1
        return ok

    async def wait(self) -> None:
        """Until a frame fits the pace, then take it (for a sender with no camera clock,
        which delays frames instead of skipping them)."""
        while True:
            bucket, rate = self._bucket, self.rate_hz
            if bucket is None or rate is None or bucket.take(time.monotonic()):
                self.sent += 1
                return
            await asyncio.sleep(min(0.05, 1 / rate))

    async def follow(self, sub: Subscription[Message]) -> None:
        """Read paces from ``sub`` until cancelled."""
        async for msg in sub:
            self.read(msg)


async def follow_pace(bus: MessageBus, topics: Topics, source: str,
                      follower: PaceFollower | None = None
                      ) -> tuple[PaceFollower, asyncio.Task[None], Subscription[Message]]:
    """Subscribe to ``source``'s pace and keep ``follower`` (a new one by default) told; the
    retained pace, if any, arrives at once. Cancel the task and close the subscription to
    stop."""
    follower = follower or PaceFollower()
    sub = await bus.subscribe(topics.pace(source), qos=1, maxsize=8, overflow="drop-oldest")
    return follower, asyncio.create_task(follower.follow(sub)), sub
