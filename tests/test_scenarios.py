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


Act = Callable[[InProcessSystem, MemoryBus, Seen], Awaitable[None]]


async def _stream(system: InProcessSystem, frames: int, rate: float, act: Act) -> list[Result]:
    """Publish ``frames`` digits at ``rate`` while ``act`` runs; every answer, once the last
    frame's has come (or 30 s passed without one)."""
    topics = Topics(system.prefix)
    images = load_digits().test.images
    payloads = [envelope(f"f{i}", image=images[i % len(images)]) for i in range(frames)]
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
        await publish_frames(cam, topics.ingest("cam-1"), payloads, rate=rate)
        await asyncio.wait_for(acting, 30)
        with contextlib.suppress(TimeoutError):  # the last answers
            await asyncio.wait_for(seen.until(lambda rs: len({r.frame_id for r in rs}) >= frames),
                                   30)
        reader.cancel()
        rest = await collect(results, 1_000_000, 0.5)  # and anything answered twice, late
        return seen.results + rest.results


def _once_each(results: list[Result], frames: int) -> Counter[str]:
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == frames, f"{frames - len(per_frame)} frames never answered"
    assert set(per_frame.values()) == {1}, [f for f, n in per_frame.items() if n > 1]
    return Counter(r.status for r in results)


async def test_a_worker_that_drains_is_routed_around_and_serves_what_it_holds(
        tiny_bundle: Bundle) -> None:
    """Two workers, each the whole model under the plan. Once the first has served frames, it
    is stopped as on SIGTERM: it says it is draining, the admission-controller sends the rest
    to the other, what it held is served, and it ends cleanly."""
    drained: list[bool] = []

    async def drain(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        states: Subscription[Heartbeat] = await cam.subscribe(
            Topics(system.prefix).state("worker", "worker-1"),
            decode=from_payload(Heartbeat.decode))
        await seen.served_by("worker-1", 20)
        stopping = asyncio.create_task(system.member("worker-1").stop())
        while not (await states.get()).draining:  # said before it stops reading
            pass
        drained.append(True)
        await stopping

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results = await _stream(system, 300, 150, drain)
        assert not system.failed()
    assert _once_each(results, 300) == {"ok": 300}
    assert drained and not system.member("worker-1").running
    served_after = [r for r in results[-50:] if r.nodes]
    assert all("worker-1" not in r.nodes for r in served_after)  # routed around it


async def test_a_worker_that_dies_mid_stream_has_its_frames_dispatched_again(
        tiny_bundle: Bundle) -> None:
    """Once worker-2 has served frames it crashes (its connection drops, its will goes out):
    the frames it held are dispatched again at once and every frame is answered once, ok; the
    scheduler makes a plan without it."""
    plans: list[Plan] = []

    async def crash(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        plan_sub: Subscription[Plan] = await cam.subscribe(Topics(system.prefix).plan(),
                                                           decode=from_payload(Plan.decode))
        await seen.served_by("worker-2", 20)
        await system.member("worker-2").crash()
        while True:
            plan = await plan_sub.get()
            if plan.reason == "node-lost":
                plans.append(plan)
                return

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results = await _stream(system, 300, 150, crash)
        assert not system.failed()
    assert _once_each(results, 300) == {"ok": 300}
    assert "worker-2" not in plans[0].nodes


async def test_a_worker_that_joins_mid_stream_gets_work_and_nothing_is_answered_twice(
        tiny_bundle: Bundle) -> None:
    """A third worker joins while frames flow: the scheduler plans it in (``node-joined``),
    it serves frames, and every frame is answered once."""

    async def join(system: InProcessSystem, cam: MemoryBus, seen: Seen) -> None:
        plan_sub: Subscription[Plan] = await cam.subscribe(Topics(system.prefix).plan(),
                                                           decode=from_payload(Plan.decode))
        await seen.served_by("worker-1", 20)
        system.add_worker("worker-3", tuple(range(1, system.bundle.num_segments + 1)))
        while (await plan_sub.get()).reason != "node-joined":
            pass
        await seen.served_by("worker-3", 1)

    async with InProcessSystem(tiny_bundle, 2, env=ENV) as system:
        results = await _stream(system, 400, 150, join)
        assert not system.failed()
    assert _once_each(results, 400) == {"ok": 400}
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
