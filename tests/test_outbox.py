"""The Outbox: up to ``bound`` publishes in flight, the caller waits beyond that, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from offramp.bus.outbox import Outbox

pytestmark = pytest.mark.tier("pure")


class Publishes:
    """Publishes that end when the test says so, counting how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.done: list[int] = []
        self.release = asyncio.Event()

    async def publish(self, n: int) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
            self.done.append(n)
        finally:
            self.running -= 1


async def test_the_bound_holds_and_every_publish_ends() -> None:
    p = Publishes()
    async with Outbox(3, grace_s=None) as outbox:
        for n in range(3):
            await outbox.send(p.publish(n))
        fourth = asyncio.create_task(outbox.send(p.publish(3)))
        await asyncio.sleep(0.05)
        assert not fourth.done() and len(outbox) == 3  # the caller waits while it is full
        p.release.set()
        await fourth
        for n in range(4, 50):
            await outbox.send(p.publish(n))
    assert sorted(p.done) == list(range(50))
    assert p.most == 3


async def test_several_waiting_senders_go_on_one_at_a_time_as_room_appears() -> None:
    gates = [asyncio.Event() for _ in range(6)]

    async def publish(n: int) -> None:
        await gates[n].wait()

    async with Outbox(2, grace_s=None) as outbox:
        await outbox.send(publish(0))
        await outbox.send(publish(1))
        senders = [asyncio.create_task(outbox.send(publish(n))) for n in (2, 3, 4, 5)]
        await asyncio.sleep(0.02)
        assert [s.done() for s in senders] == [False] * 4
        gates[0].set()
        await asyncio.sleep(0.02)
        assert sum(s.done() for s in senders) == 1 and len(outbox) == 2  # one slot, one sender
        for gate in gates:
            gate.set()
        await asyncio.gather(*senders)
    assert len(outbox) == 0


async def test_flush_waits_for_what_is_in_flight_and_the_exit_cancels_the_rest() -> None:
    p = Publishes()
    outbox = Outbox(4, grace_s=0.05)
    async with outbox:
        await outbox.send(p.publish(0))
        await outbox.flush(0.05)  # not released: still in flight after the timeout
        assert len(outbox) == 1
    assert p.running == 0 and p.done == []  # cancelled on the way out, after the grace
