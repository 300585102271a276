"""A system's members come and go while frames flow, on the in-process harness
(:class:`offramp.local.inprocess.InProcessSystem`): a worker drains, a worker dies, a worker
joins. Each scenario acts when the system has reached the state it is about (a result served
by the member, a heartbeat, a plan), not after a fixed sleep, and every frame is answered
exactly once. Signals, wills of a real broker and restarts stay with the process tier
(test_system.py, test_ownership.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from offramp.bus import Subscription, Topics, from_payload
from offramp.bus.memory import MemoryBus
from offramp.errors import OfframpError
from offramp.local.client import collect, envelope, publish_frames, wait_for_plan, wait_for_workers
from offramp.local.inprocess import InProcessSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.wire import Heartbeat, Plan, Result, read_results

pytestmark = pytest.mark.tier("inproc")

ENV = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "1.5", "OFFRAMP_ARBITER_REPUBLISH_S": "0.5",
       "OFFRAMP_SCHEDULER_SETTLE_S": "0.2"}


class Seen:
    """The answers seen so far, and a way to wait until they say something."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self._new = asyncio.Event()

    def add(self, results: list[Result]) -> None:
        self.results.extend(results)
        self._new.set()

    async def until(self, done: Callable[[list[Result]], bool]) -> None:
        while not done(self.results):
            self._new.clear()
            await self._new.wait()

    async def served_by(self, node: str, count: int) -> None:
        """Until ``node`` has served ``count`` of the answers seen."""
        await self.until(lambda rs: sum(node in r.nodes for r in rs) >= count)

    async def busiest(self, count: int) -> str:
        """The first node to have served ``count`` of the answers seen (under the plan both
        workers host the whole model, and either may get most of the work)."""
        def by_node(rs: list[Result]) -> Counter[str]:
            return Counter(n for r in rs for n in set(r.nodes))

        await self.until(lambda rs: max(by_node(rs).values(), default=0) >= count)
        return by_node(self.results).most_common(1)[0][0]


Act = Callable[[InProcessSystem, MemoryBus, Seen], Awaitable[None]]
CHUNK = 25  # frames published between looks at whether the scenario is done


async def _stream(system: InProcessSystem, frames: int, rate: float,
                  act: Act) -> tuple[list[Result], int]:
    """Publish digits at ``rate`` while ``act`` runs: at least ``frames``, and on until it is
    done (at most ten times as many); every answer, once the last frame's has come (or 30 s
    passed without one), and how many frames were sent."""
    topics = Topics(system.prefix)
    images = load_digits().test.images
    async with system.client("camera") as cam:
        await wait_for_workers(cam, topics, system.workers, 30)
        await wait_for_plan(cam, topics, 30)
        results = await cam.subscribe(topics.results_all(), maxsize=100_000)
        seen = Seen()

        async def read() -> None:
            async for msg in results:
                seen.add(read_results(msg.payload))

        reader = asyncio.create_task(read())
        acting = asyncio.create_task(act(system, cam, seen))
        sent = 0
        while sent < frames or not acting.done():
            assert sent < 10 * frames, "the scenario never reached the state it waits for"
            chunk = [envelope(f"f{sent + i}", image=images[(sent + i) % len(images)])
                     for i in range(CHUNK)]
            await publish_frames(cam, topics.ingest("cam-1"), chunk, rate=rate)
            sent += CHUNK
        await acting  # raises what the scenario raised
        with contextlib.suppress(TimeoutError):  # the last answers
            await asyncio.wait_for(seen.until(lambda rs: len({r.frame_id for r in rs}) >= sent),
                                   30)
        reader.cancel()
        rest = await collect(results, 1_000_000, 0.5)  # and anything answered twice, late
        return seen.results + rest.results, sent


def _once_each(results: list[Result], sent: int) -> Counter[str]:
    """Each of the ``sent`` frames answered exactly once; the answers by status."""
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == sent, f"{sent - len(per_frame)} frames never answered"
    assert set(per_frame.values()) == {1}, [f for f, n in per_frame.items() if n > 1]
    return Counter(r.status for r in results)


async def test_a_worker_that_drains_is_routed_around_and_serves_what_it_holds(
        tiny_bundle: Bundle) -> None:
    """Two workers, each the whole model under the plan. Once one has served frames, it is
    stopped as on SIGTERM: it says it is draining, the admission-controller sends the rest
    to the other, what it held is served, and it ends cleanly."""
    drained: list[str] = []

    async def drain(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        victim = await seen.busiest(20)
        states: Subscription[Heartbeat] = await cam.subscribe(
            Topics(system.prefix).state("worker", victim), decode=from_payload(Heartbeat.decode))
        stopping = asyncio.create_task(system.member(victim).stop())
        while not (await states.get()).draining:  # said before it stops reading
            pass
        drained.append(victim)
        await stopping

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results, sent = await _stream(system, 300, 150, drain)
        assert not system.failed()
    assert set(_once_each(results, sent)) == {"ok"}
    [victim] = drained
    assert not system.member(victim).running
    served_after = [r for r in results[-50:] if r.nodes]
    assert all(victim not in r.nodes for r in served_after)  # routed around it


async def test_a_worker_that_dies_mid_stream_has_its_frames_dispatched_again(
        tiny_bundle: Bundle) -> None:
    """Once a worker has served frames it crashes (its connection drops, its will goes out):
    the frames it held are dispatched again at once and every frame is answered once, ok; the
    scheduler makes a plan without it."""
    plans: list[Plan] = []
    crashed: list[str] = []

    async def crash(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        plan_sub: Subscription[Plan] = await cam.subscribe(Topics(system.prefix).plan(),
                                                           decode=from_payload(Plan.decode))
        victim = await seen.busiest(20)
        await system.member(victim).crash()
        while True:
            plan = await plan_sub.get()
            if plan.reason == "node-lost":
                plans.append(plan)
                crashed.append(victim)
                return

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results, sent = await _stream(system, 300, 150, crash)
        assert not system.failed()
    assert set(_once_each(results, sent)) == {"ok"}
    assert crashed[0] not in plans[0].nodes


async def test_a_worker_that_joins_mid_stream_gets_work_and_nothing_is_answered_twice(
        tiny_bundle: Bundle) -> None:
    """A third worker joins while frames flow: the scheduler plans it in (``node-joined``),
    it serves frames, and every frame is answered once."""

    async def join(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        plan_sub: Subscription[Plan] = await cam.subscribe(Topics(system.prefix).plan(),
                                                           decode=from_payload(Plan.decode))
        await seen.busiest(20)
        system.add_worker("worker-3", tuple(range(1, system.bundle.num_segments + 1)))
        while (await plan_sub.get()).reason != "node-joined":
            pass
        await seen.served_by("worker-3", 1)

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results, sent = await _stream(system, 400, 150, join)
        assert not system.failed()
    assert set(_once_each(results, sent)) == {"ok"}
    assert any("worker-3" in r.nodes for r in results)


async def test_the_harness_names_an_unknown_service_and_a_node_taken_twice(
        tiny_bundle: Bundle) -> None:
    async with InProcessSystem(tiny_bundle, 1, env=ENV) as system:
        with pytest.raises(OfframpError, match="no service named 'segment-wrker'"):
            system.add("segment-wrker", "w9")
        with pytest.raises(OfframpError, match="'worker-1' is already in the system"):
            system.add_worker("worker-1", (1,))
        await system.member("worker-1").crash()
        assert not system.member("worker-1").running and not system.failed()
