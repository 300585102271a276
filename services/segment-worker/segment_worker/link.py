"""An emulated outgoing link: delay and bandwidth applied in the application.

The kernel here has no netem, so a slower link is emulated where packets leave a node: each
message departs when the link has finished sending the previous ones (``bytes / rate``) and is
delivered ``delay`` later, in order. With neither set (real deployments) a send goes straight
out. Sends in flight are bounded by the outbox: a full link makes the sender wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from offramp.bus.outbox import Outbox

Send = Callable[[str, bytes], Awaitable[None]]


class Link:
    def __init__(self, send: Send, *, rate_bps: float = 0.0, delay_s: float = 0.0,
                 in_flight: int = 256) -> None:
        self._send = send
        self.rate_bps = rate_bps
        self.delay_s = delay_s
        self.outbox = Outbox(in_flight)
        self._free_at = 0.0
        self.sent_bytes = 0

    @property
    def emulated(self) -> bool:
        return self.rate_bps > 0 or self.delay_s > 0

    def transfer_s(self, nbytes: int) -> float:
        """What this link adds to a message of ``nbytes`` when it is idle."""
        return self.delay_s + (8 * nbytes / self.rate_bps if self.rate_bps > 0 else 0.0)

    async def send(self, topic: str, payload: bytes) -> None:
        self.sent_bytes += len(payload)
        if not self.emulated:
            await self._send(topic, payload)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        serialise = 8 * len(payload) / self.rate_bps if self.rate_bps > 0 else 0.0
        self._free_at = max(now, self._free_at) + serialise
        await self.outbox.send(self._deliver(self._free_at + self.delay_s, topic, payload))

    async def _deliver(self, at: float, topic: str, payload: bytes) -> None:
        await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
        await self._send(topic, payload)

    def __len__(self) -> int:
        return len(self.outbox)
