"""The middle tier: services and their parts built in this process on the in-memory bus, with
a real ONNX bundle. Between the pure policy tests and the system tests that start process
groups on a real broker; most of these run in milliseconds once the bundle exists."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import structlog
from test_system import reference

from admission_controller.dispatch import DispatchConfig, Dispatcher
from admission_controller.service import run as admission_run
from admission_controller.settings import AdmissionSettings
from admission_controller.tracker import Task, Tracker
from exit_arbiter.service import ArbiterSettings, make_policy
from exit_arbiter.service import run as arbiter_run
from offramp.bus import MemoryBroker, MemoryBus, Topics, Will, from_payload
from offramp.local.client import collect, envelope, publish_frames, wait_for_workers
from offramp.model.bundle import Bundle
from offramp.model.inputs import normalise
from offramp.node.peers import PeerTable
from offramp.policy.offload import Candidate
from offramp.settings import load
from offramp.wire import (
    ActivationPacket,
    DoneReport,
    Grant,
    Heartbeat,
    Plan,
    Refusal,
    Result,
    Sample,
    SegmentLoad,
    SegmentRef,
    Tensor,
    Want,
)
from priority_scheduler.service import SchedulerSettings
from priority_scheduler.service import run as scheduler_run
from segment_worker.engine import Engine, Port
from segment_worker.hosting import Hosting
from segment_worker.placer import Outlet, Placer, Transmit
from segment_worker.queue import Item
from segment_worker.service import run as worker_run
from segment_worker.settings import EngineConfig, WorkerSettings

pytestmark = pytest.mark.tier("inproc")

LOG = structlog.get_logger("test")


def _connect(broker: MemoryBroker) -> Callable[[str, Will], MemoryBus]:
    return lambda client_id, will: MemoryBus(broker, client_id, will=will)


async def _bundle_ready(engine: Engine, bundle: Bundle) -> None:
    loop = asyncio.get_running_loop()
    for s in bundle.manifest.segments:
        engine.host(s.index, await loop.run_in_executor(None, engine.load, s.index))


# -- the whole system in one process ---------------------------------------------------------
@pytest.mark.parametrize("codec", ["raw", "int8"])
async def test_the_whole_system_in_one_process_answers_like_the_chain(
        tiny_bundle: Bundle, codec: str) -> None:
    """Admission, arbiter, scheduler and two workers as coroutines on one memory broker: every
    frame answered, each answer equal to the chained segments run here one by one. With the
    input sent as int8 (a quarter of the bytes), all but a few frames near a threshold (one
    of the 40 here)."""
    from offramp.ml.data import load_digits

    broker = MemoryBroker()
    root = str(tiny_bundle.root)
    env = {"OFFRAMP_TOPIC_PREFIX": "inproc", "OFFRAMP_LOG_LEVEL": "warning",
           "OFFRAMP_ADMISSION_BUNDLE": root, "OFFRAMP_WORKER_BUNDLE": root,
           "OFFRAMP_ARBITER_BUNDLE": root, "OFFRAMP_SCHEDULER_BUNDLE": root,
           "OFFRAMP_SCHEDULER_SETTLE_S": "0.2", "OFFRAMP_WORKER_FOLLOW_PLAN": "false",
           "OFFRAMP_ADMISSION_CODEC": codec}
    k = tiny_bundle.num_segments
    stop = asyncio.Event()
    images = load_digits().test.images[:40]
    policy = make_policy(ArbiterSettings(), tiny_bundle.calibration(), tiny_bundle.name, 1)
    want = reference(tiny_bundle, images, policy)
    topics = Topics("inproc")
    connect = _connect(broker)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(arbiter_run(load(ArbiterSettings, "OFFRAMP_ARBITER_",
                                        {**env, "OFFRAMP_NODE": "arbiter-1"}), stop,
                                   connect=connect))
        tg.create_task(scheduler_run(load(SchedulerSettings, "OFFRAMP_SCHEDULER_",
                                          {**env, "OFFRAMP_NODE": "scheduler-1"}), stop,
                                     connect=connect))
        for node, segs in (("worker-1", "1,2"), ("worker-2", ",".join(map(str, range(3, k + 1))))):
            tg.create_task(worker_run(load(WorkerSettings, "OFFRAMP_WORKER_", {
                **env, "OFFRAMP_NODE": node, "OFFRAMP_WORKER_SEGMENTS": segs}), stop,
                connect=connect))
        tg.create_task(admission_run(load(AdmissionSettings, "OFFRAMP_ADMISSION_",
                                          {**env, "OFFRAMP_NODE": "admission-1"}), stop,
                                     connect=connect))
        try:
            async with MemoryBus(broker, "camera") as cam:
                await wait_for_workers(cam, topics, 2, 20)
                policies = await cam.subscribe(topics.exit_policy(tiny_bundle.name))
                await asyncio.wait_for(policies.get(), 10)
                results = await cam.subscribe(topics.results_all(), maxsize=1000)
                payloads = [envelope(f"f{i}", image=im) for i, im in enumerate(images)]
                await publish_frames(cam, topics.ingest("cam-1"), payloads, rate=0)
                got = await collect(results, len(payloads), 30)
        finally:
            stop.set()
    by_frame = {r.frame_id: r for r in got.results}
    assert len(got.results) == len(payloads) == len(by_frame)
    assert all(r.status == "ok" for r in got.results)
    differ = [(i, by_frame[f"f{i}"], expected) for i, expected in enumerate(want)
              if (by_frame[f"f{i}"].label, by_frame[f"f{i}"].exit_index)
              != (expected.label, expected.exit_index)]
    assert len(differ) <= (0 if codec == "raw" else 3), differ


# -- the worker's engine ----------------------------------------------------------------------
@pytest.fixture(params=[(False, True), (True, True), (True, False)],
                ids=["host", "resident", "resident-stepwise"])
async def engine(tiny_bundle: Bundle, request: pytest.FixtureRequest,
                 ) -> AsyncIterator[tuple[Engine, MemoryBus, Topics]]:
    """An engine on the memory bus hosting every segment, with activations handed over on
    the host or kept in ONNX Runtime's buffers (resident: the GPU path, on the CPU here); a
    micro-batch runs through the hosted segments in one hand-off to the inference thread, or
    (stepwise) in one per segment."""
    resident, run_through = request.param
    broker = MemoryBroker()
    topics = Topics("eng")
    async with MemoryBus(broker, "w1") as bus:
        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await bus.publish(topic, payload, qos=qos)

        cfg = EngineConfig(node="w1", batch_max=8, batch_wait_s=0.0, resident=resident,
                           run_through=run_through)
        async with Engine(tiny_bundle, cfg, PeerTable("w1"), Port(topics, publish)) as eng:
            await _bundle_ready(eng, tiny_bundle)
            yield eng, bus, topics


def _packet(bundle: Bundle, n: int, offset: int = 0) -> tuple[np.ndarray, bytes]:
    from offramp.ml.data import load_digits

    images = load_digits().test.images[offset:offset + n]
    x = normalise(images, bundle.manifest.input)
    samples = tuple(Sample(task_id=f"t{i}", source="cam", frame_id=f"f{i}", created=time.time())
                    for i in range(n))
    return images, ActivationPacket(model=bundle.name, segment=1, samples=samples,
                                    tensor=Tensor.encode(x)).encode()


async def _serve_all(eng: Engine, k: int, until: Callable[[], Awaitable[Any]]) -> Any:
    """Serve every segment until ``until()`` returns (then stop serving, as hosting does)."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        servers = [tg.create_task(eng.serve(seg, stop)) for seg in range(1, k + 1)]
        try:
            return await until()
        finally:
            for task in servers:
                task.cancel()


async def test_one_engine_hosting_every_segment_answers_like_the_chain(
        engine: tuple[Engine, MemoryBus, Topics], tiny_bundle: Bundle) -> None:
    eng, bus, topics = engine
    eng.apply_policy(make_policy(ArbiterSettings(), tiny_bundle.calibration(), tiny_bundle.name, 1))
    done = await bus.subscribe(topics.done_all(), decode=from_payload(DoneReport.decode))
    images, packet = _packet(tiny_bundle, 24)
    assert await eng.accept(packet, 1 << 24) == 24

    async def answers() -> list[Any]:
        out: list[Any] = []
        while len(out) < 24:
            out.extend((await asyncio.wait_for(done.get(), 10)).completions)
        return out

    completions = await _serve_all(eng, tiny_bundle.num_segments, answers)
    want = reference(tiny_bundle, images, eng.policy)
    got = {c.frame_id: c for c in completions}
    for i, expected in enumerate(want):
        c = got[f"f{i}"]
        assert (c.label, c.exit_index) == (expected.label, expected.exit_index)
        assert [h.segment for h in c.hops] == list(range(1, c.exit_index + 1))
        assert all(h.node == "w1" and h.arrived <= h.started <= h.finished for h in c.hops)
        assert all(a.finished <= b.arrived for a, b in itertools.pairwise(c.hops))
    assert eng.idle()
    stats = {seg: h.stats for seg, h in eng.segments.items()}
    assert stats[1].samples == 24 and stats[1].exited + stats[1].forwarded + \
        stats[2].handed_over == 24
    assert all(stats[k].samples == stats[k - 1].samples - stats[k - 1].exited for k in (2, 3, 4))
    if eng.cfg.resident:  # exited rows were dropped on the device, by the bundle's rows.onnx
        assert eng.transfers["on_device"] > 0


async def test_bad_and_misrouted_packets_are_counted_not_raised(
        engine: tuple[Engine, MemoryBus, Topics], tiny_bundle: Bundle) -> None:
    eng, _, _ = engine
    assert await eng.accept(b"\x00garbage", 1 << 20) == 0
    other = ActivationPacket(model="other", segment=1, samples=(
        Sample(task_id="t", source="s", frame_id="f"),),
        tensor=Tensor.encode(np.zeros((1, 3, 32, 32), np.float32))).encode()
    assert await eng.accept(other, 1 << 20) == 0
    assert (eng.counters.bad_packets, eng.counters.misrouted) == (1, 1)


async def test_a_draining_engine_advertises_nothing_and_grants_no_credit(
        engine: tuple[Engine, MemoryBus, Topics]) -> None:
    eng, _, _ = engine
    assert [s.segment for s in eng.advertiser.loads(time.monotonic())] == [1, 2, 3, 4]
    eng.drain()
    assert eng.advertiser.loads(time.monotonic()) == () and eng.serving() == []
    assert not eng.advertiser.credit_due()
    assert eng.segments.local_candidate(2, 1.0) is not None  # its own work still moves on here
    peers = PeerTable("w2")
    load = SegmentLoad(model="m", segment=1, service_rate=100.0,
                       credits={"w2": Grant(boot=0.0, limit=10)})
    peers.update(Heartbeat(role="worker", node="w1", segments=(load,), draining=True))
    assert peers.candidates("m", 1) == []


# -- the placer -------------------------------------------------------------------------------
class _Stages:
    def __init__(self, local: Candidate | None) -> None:
        self.local = local
        self.handed: list[tuple[int, int]] = []
        self.left: list[tuple[int, int]] = []

    def local_candidate(self, segment: int, priority: float) -> Candidate | None:
        return self.local

    def hand_over(self, segment: int, items: list[Item]) -> None:
        self.handed.append((segment, len(items)))

    async def went(self, segment: int, node: str, items: list[Item]) -> None:
        """The outlet's ``left``: after each packet sent."""
        self.left.append((segment, len(items)))


def _placer(peers: PeerTable, stages: _Stages, transmit: Transmit, *,
            cfg: EngineConfig | None = None, **outlet: Any) -> Placer:
    """A placer on node w1 of model m, its packets going to ``transmit``."""
    out = Outlet(transmit, lambda seg, node: f"act/m/{seg}/{node}", left=stages.went, **outlet)
    return Placer(cfg or EngineConfig(node="w1"), model="m", boot=0.0, peers=peers,
                  stages=stages, out=out)


def _items(n: int, priority: float = 1.0) -> list[Item]:
    return [Item(Sample(task_id=f"t{i}", source="cam", frame_id=f"f{i}", priority=priority),
                 np.zeros(16, np.float32), None, time.time()) for i in range(n)]


def _worker_beat(node: str, segment: int, *, grant_to: str, limit: int,
                 sender_boot: float = 0.0) -> Heartbeat:
    """A worker's heartbeat granting ``grant_to`` (that run of it) ``limit`` samples in all."""
    load = SegmentLoad(model="m", segment=segment, service_rate=1000.0,
                       credits={grant_to: Grant(boot=sender_boot, limit=limit)})
    return Heartbeat(role="worker", node=node, segments=(load,))


async def test_the_placer_sends_within_credit_and_keeps_the_rest() -> None:
    sent: list[tuple[str, int]] = []
    nudges: list[int] = []

    async def transmit(topic: str, payload: bytes) -> None:
        sent.append((topic, len(ActivationPacket.decode(payload).samples)))

    peers = PeerTable("w1")
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=5))
    stages = _Stages(local=None)
    placer = _placer(peers, stages, transmit, nudge=lambda: nudges.append(1))
    await placer.forward(2, _items(8))
    assert sent == [("act/m/2/w2", 5)]
    assert placer.parked(2) == 3 and nudges  # asked for more at once
    assert stages.left == [(2, 5)]
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=8))
    await placer.retry()
    assert sent[-1] == ("act/m/2/w2", 3) and placer.parked() == 0


async def test_the_placer_hands_a_slow_link_only_half_a_second_at_once() -> None:
    """Credit for 8 samples, a link of 10 samples' bytes a second: 5 go now (0.5 s), the rest
    wait parked while the connection still holds them, and go once it has drained."""
    sent: list[int] = []
    unsent = [0]

    async def transmit(topic: str, payload: bytes) -> None:
        packet = ActivationPacket.decode(payload)
        sent.append(len(packet.samples))
        unsent[0] += len(payload)

    items = _items(8)
    per_sample = items[0].x.nbytes
    peers = PeerTable("w1")
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=8))
    placer = _placer(peers, _Stages(local=None), transmit,
                     uplink=lambda: (10.0 * per_sample, 0.001), unsent=lambda: unsent[0])
    await placer.forward(2, items)
    assert sent == [5] and placer.parked(2) == 3
    await placer.retry()  # the connection still holds the first packet: nothing more
    assert sent == [5] and placer.parked(2) == 3
    unsent[0] = 0  # delivered
    await placer.retry()
    assert sent == [5, 3] and placer.parked() == 0


async def test_placements_at_once_never_spend_the_same_credit_twice() -> None:
    """Encoding awaits (an autoencoder runs on the inference thread): two placements under
    way at once must still send no more than the credit granted."""
    sent: list[int] = []

    async def transmit(topic: str, payload: bytes) -> None:
        sent.append(len(ActivationPacket.decode(payload).samples))

    async def slow_encode(segment: int, node: str, x: np.ndarray) -> tuple[Tensor, str]:
        await asyncio.sleep(0.01)
        return Tensor.encode(x), "raw"

    peers = PeerTable("w1")
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=5))
    placer = _placer(peers, _Stages(local=None), transmit, encode=slow_encode)
    await asyncio.gather(placer.forward(2, _items(4)), placer.forward(2, _items(4)))
    assert sum(sent) == 5 and placer.parked(2) == 3


async def test_a_batch_over_the_brokers_limit_goes_as_several_packets() -> None:
    """Twenty samples of 4 KB do not fit a 30 KB message: they go as packets that each fit,
    every sample exactly once, counted by codec and as one split. A single sample over the
    limit cannot go: it is counted and named, not sent, and the rest still goes."""
    sent: list[tuple[int, int]] = []  # (samples, bytes) per packet

    async def transmit(topic: str, payload: bytes) -> None:
        sent.append((len(ActivationPacket.decode(payload).samples), len(payload)))

    def big(n: int, floats: int) -> list[Item]:
        return [replace(it, x=np.ones(floats, np.float32)) for it in _items(n)]

    peers = PeerTable("w1")
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=100))
    stages = _Stages(local=None)
    placer = _placer(peers, stages, transmit, max_payload=lambda topic: 30_000)
    await placer.forward(2, big(20, 1000))
    assert sum(n for n, _ in sent) == 20 and len(sent) >= 3
    assert all(size <= 30_000 for _, size in sent)
    assert sum(n for _, n in stages.left) == 20
    assert placer.split >= 1 and placer.by_codec == {"raw": 20} and placer.too_large == 0
    sent.clear()
    await placer.forward(2, big(1, 10_000))
    assert sent == [] and placer.too_large == 1


async def test_the_placer_keeps_near_ties_local() -> None:
    sent: list[str] = []

    async def transmit(topic: str, payload: bytes) -> None:
        sent.append(topic)

    peers = PeerTable("w1")
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=100))
    stages = _Stages(local=Candidate("w1", 0.0005, 0.001, local=True, credit=100))
    placer = _placer(peers, stages, transmit,
                     cfg=EngineConfig(node="w1", offload_margin_s=0.002))
    await placer.forward(2, _items(4))
    assert stages.handed == [(2, 4)] and sent == []


async def test_a_batch_runs_through_here_only_where_the_placer_would_keep_it() -> None:
    """The run-through asks the placer first: kept here with no neighbour, or a neighbour
    only a near tie; not with a neighbour whose backlog is much shorter, nor past parked
    work."""
    async def transmit(topic: str, payload: bytes) -> None:
        return None

    peers = PeerTable("w1")
    stages = _Stages(local=Candidate("w1", 0.0005, 0.001, local=True, credit=100))
    placer = _placer(peers, stages, transmit,
                     cfg=EngineConfig(node="w1", offload_margin_s=0.002))
    assert placer.stays_here(2, 1.0, 4, 64)
    peers.update(_worker_beat("w2", 2, grant_to="w1", limit=100))  # a near tie: still here
    assert placer.stays_here(2, 1.0, 4, 64)
    stages.local = Candidate("w1", 0.5, 0.001, local=True, credit=100)  # half a second queued
    assert not placer.stays_here(2, 1.0, 4, 64)
    stages.local = Candidate("w1", 0.0005, 0.001, local=True, credit=2)  # room for 2 of 4
    peers.forget("w2")
    assert not placer.stays_here(2, 1.0, 4, 64)
    stages.local = None  # nobody takes it now: parked
    await placer.forward(2, _items(1))
    assert placer.parked(2) == 1
    stages.local = Candidate("w1", 0.0005, 0.001, local=True, credit=100)
    assert not placer.stays_here(2, 1.0, 4, 64)


class _SlowUnsubscribe(MemoryBus):
    """A bus whose unsubscribe round trip waits for ``gate`` (a broker slow to answer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsubscribing = asyncio.Event()
        self.gate = asyncio.Event()

    async def _remote_unsubscribe(self, sub: Any) -> None:
        self.unsubscribing.set()
        await self.gate.wait()
        await super()._remote_unsubscribe(sub)


async def test_a_segment_taken_back_while_it_unsubscribes_is_subscribed_again(
        engine: tuple[Engine, MemoryBus, Topics], tiny_bundle: Bundle) -> None:
    """A plan that gives a segment back while its unload waits for the broker's unsubscribe
    answer: the segment ends hosted *and* reading its topic (before, it stayed advertised
    with no subscription, and every packet sent to it was lost)."""
    eng, bus, topics = engine
    async with _SlowUnsubscribe(bus.broker, "w1-listen") as slow:
        async def listen(seg: int) -> Any:
            return await slow.subscribe(topics.act(tiny_bundle.name, seg, "w1"))

        hosting = Hosting(eng, listen, max_bytes=1 << 24, grace_s=0.0, log=LOG)
        for seg in (1, 2, 3):
            await hosting.load(seg)
        ref = [SegmentRef(model=tiny_bundle.name, segment=s) for s in (1, 2, 3)]
        async with asyncio.TaskGroup() as tg:
            hosting.start(tg)
            await hosting.follow(Plan(epoch=1, ts=0.0, nodes={"w1": tuple(ref[:2])}), {1, 2, 3})
            await asyncio.wait_for(slow.unsubscribing.wait(), 5)  # segment 3's teardown
            back = tg.create_task(hosting.follow(Plan(epoch=2, ts=0.0, nodes={"w1": tuple(ref)}),
                                                 {1, 2, 3}))
            await asyncio.sleep(0.05)
            slow.gate.set()
            await asyncio.wait_for(back, 5)
            assert eng.serving() == [1, 2, 3]
            await bus.publish(topics.act(tiny_bundle.name, 3, "w1"), b"not a packet", qos=1)
            async with asyncio.timeout(5):
                while eng.counters.bad_packets == 0:  # noqa: ASYNC110 - read by the intake
                    await asyncio.sleep(0.01)
            hosting.finish()


# -- the dispatcher ---------------------------------------------------------------------------
async def test_the_dispatcher_sends_within_credit_highest_priority_first() -> None:
    packets: list[tuple[str, ActivationPacket]] = []

    async def send(node: str, packet: bytes) -> None:
        packets.append((node, ActivationPacket.decode(packet)))

    tracker = Tracker(100, 5.0, 3)
    nudges: list[int] = []
    d = Dispatcher(DispatchConfig(model="m", segments=2, node="adm", batch=4, wait_s=0.0),
                   tracker=tracker, send=send, nudge=lambda: nudges.append(1), log=LOG)
    tasks = [Task(f"t{i}", "cam", f"f{i}", np.zeros(8, np.float32), time.time(),
                  priority=4.0 if i >= 6 else 1.0) for i in range(8)]
    for t in tasks:
        tracker.add(t)
    d.submit(tasks)
    await d.dispatch()
    assert packets == [] and d.waiting() == 8 and nudges  # no credit yet: ask for it
    d.peers.update(_worker_beat("w1", 1, grant_to="adm", limit=3, sender_boot=d.boot))
    await d.dispatch()
    assert [(n, [s.task_id for s in p.samples]) for n, p in packets] == [
        ("w1", ["t6", "t7"]), ("w1", ["t0"])]  # a packet per priority, the higher first
    assert d.waiting() == 5 and d.waiting(priority=4.0) == 0
    assert tracker.complete("t1") is not None  # answered meanwhile: never sent
    d.peers.update(_worker_beat("w1", 1, grant_to="adm", limit=10, sender_boot=d.boot))
    await d.dispatch()
    assert sorted(s.task_id for _, p in packets[2:] for s in p.samples) == ["t2", "t3", "t4", "t5"]
    assert all(len(p.samples) <= 4 for _, p in packets)


# -- hosting ----------------------------------------------------------------------------------
async def test_hosting_follows_a_plan_unloads_what_it_lost_and_takes_it_back(
        engine: tuple[Engine, MemoryBus, Topics], tiny_bundle: Bundle) -> None:
    eng, bus, topics = engine

    async def listen(seg: int) -> Any:
        return await bus.subscribe(topics.act(tiny_bundle.name, seg, "w1"))

    hosting = Hosting(eng, listen, max_bytes=1 << 24, grace_s=0.0, log=LOG)
    for seg in (1, 2, 3, 4):
        await hosting.load(seg)
    ref = [SegmentRef(model=tiny_bundle.name, segment=s) for s in (1, 2)]
    async with asyncio.TaskGroup() as tg:
        hosting.start(tg)
        await hosting.follow(Plan(epoch=1, ts=0.0, nodes={"w1": tuple(ref)}), {1, 2, 3, 4})
        assert eng.serving() == [1, 2]
        async with asyncio.timeout(5):
            while eng.hosts() != {1, 2}:  # noqa: ASYNC110 - the unloads run in the group
                await asyncio.sleep(0.01)
        await hosting.follow(Plan(epoch=1, ts=0.0, nodes={"w1": ()}), {1, 2, 3, 4})
        assert eng.serving() == [1, 2]  # not newer: ignored
        await hosting.follow(Plan(epoch=2, ts=0.0, nodes={"w1": (*ref, SegmentRef(
            model=tiny_bundle.name, segment=3))}), {1, 2, 3, 4})
        assert eng.serving() == [1, 2, 3]
        hosting.finish()


def _services_env(bundle: Bundle, prefix: str) -> dict[str, str]:
    """One bundle for every service, fast heartbeats, workers pinned (no scheduler)."""
    root = str(bundle.root)
    return {"OFFRAMP_TOPIC_PREFIX": prefix, "OFFRAMP_LOG_LEVEL": "warning",
            "OFFRAMP_ADMISSION_BUNDLE": root, "OFFRAMP_WORKER_BUNDLE": root,
            "OFFRAMP_ARBITER_BUNDLE": root, "OFFRAMP_WORKER_FOLLOW_PLAN": "false",
            "OFFRAMP_HEARTBEAT_S": "0.1"}


def _start_arbiter_and_worker(tg: asyncio.TaskGroup, env: dict[str, str], stop: asyncio.Event,
                              connect: Callable[[str, Will], MemoryBus]) -> None:
    tg.create_task(arbiter_run(load(ArbiterSettings, "OFFRAMP_ARBITER_",
                                    {**env, "OFFRAMP_NODE": "arbiter-1"}), stop,
                               connect=connect))
    tg.create_task(worker_run(load(WorkerSettings, "OFFRAMP_WORKER_",
                                   {**env, "OFFRAMP_NODE": "worker-1"}), stop,
                              connect=connect))


async def test_a_standby_does_not_answer_again_what_the_member_before_it_answered(
        tiny_bundle: Bundle) -> None:
    """The active member answered f1 (a result) and f2 (in a refusal) and died before
    acknowledging them, so the broker hands them to its standby when it takes the session.
    The standby saw those answers and acknowledges the two without answering them again; f3,
    which nobody answered, it answers."""
    from offramp.ml.data import load_digits

    broker = MemoryBroker()
    env = _services_env(tiny_bundle, "takeover")
    topics = Topics("takeover")
    connect = _connect(broker)
    stop = asyncio.Event()
    image = load_digits().test.images[0]
    async with asyncio.TaskGroup() as tg:
        _start_arbiter_and_worker(tg, env, stop, connect)
        try:
            async with MemoryBus(broker, "others") as bus:
                active = Heartbeat(role="admission", node="admission-1", group="admission",
                                   active_since=time.time())
                state = topics.state("admission", "admission-1")
                await bus.publish(state, active.encode(), retain=True)
                tg.create_task(admission_run(load(AdmissionSettings, "OFFRAMP_ADMISSION_", {
                    **env, "OFFRAMP_NODE": "admission-2", "OFFRAMP_ADMISSION_STANDBY": "true",
                    "OFFRAMP_ADMISSION_TAKEOVER_S": "0.3"}), stop, connect=connect))
                standby = await bus.subscribe(topics.state("admission", "admission-2"),
                                              decode=from_payload(Heartbeat.decode))
                while (await asyncio.wait_for(standby.get(), 10)).active_since:
                    pytest.fail("the standby took the session while the active member lived")
                answered = Result(task_id="admission-1-x-0", source="cam-1", frame_id="f1",
                                  status="ok", label=1)
                await bus.publish(topics.results("cam-1"), answered.to_json(), qos=1)
                refused = Refusal(source="cam-1", frames={"over the admitted rate": ["f2"]})
                await bus.publish(topics.results("cam-1"), refused.to_json(), qos=1)
                await asyncio.sleep(0.3)  # the standby has seen both
                await bus.publish(state, replace(active, online=False).encode(), retain=True)
                async with asyncio.timeout(10):
                    while not (await standby.get()).active_since:
                        pass
                results = await bus.subscribe(topics.results_all(), maxsize=100)
                for fid in ("f1", "f2", "f3"):  # as the broker hands the unacknowledged over
                    await bus.publish(topics.ingest("cam-1"), envelope(fid, image=image), qos=1)
                got = await collect(results, 3, 5)
        finally:
            stop.set()
    assert [(r.frame_id, r.status) for r in got.results] == [("f3", "ok")]


async def test_a_frame_sent_again_is_told_its_answer_again(tiny_bundle: Bundle) -> None:
    """A camera that got no answer sends the frame again under the same id. Answered before,
    it gets the same result again (same task id, same label): not silence, and not a second
    computation. Sent twice at once, it is computed once: every result it gets is the one."""
    from offramp.ml.data import load_digits

    broker = MemoryBroker()
    env = _services_env(tiny_bundle, "again")
    topics = Topics("again")
    connect = _connect(broker)
    stop = asyncio.Event()
    image = load_digits().test.images[0]
    async with asyncio.TaskGroup() as tg:
        _start_arbiter_and_worker(tg, env, stop, connect)
        tg.create_task(admission_run(load(AdmissionSettings, "OFFRAMP_ADMISSION_",
                                          {**env, "OFFRAMP_NODE": "admission-1"}), stop,
                                     connect=connect))
        try:
            async with MemoryBus(broker, "camera") as bus:
                await wait_for_workers(bus, topics, 1, 10)
                results = await bus.subscribe(topics.results_all(), maxsize=100)
                await bus.publish(topics.ingest("cam-1"), envelope("f1", image=image), qos=1)
                [first] = (await collect(results, 1, 10)).results
                await bus.publish(topics.ingest("cam-1"), envelope("f1", image=image), qos=1)
                [again] = (await collect(results, 1, 10)).results
                for _ in range(2):
                    await bus.publish(topics.ingest("cam-1"), envelope("f2", image=image),
                                      qos=1)
                twice = (await collect(results, 2, 2)).results
        finally:
            stop.set()
    assert first.status == "ok" and again == first
    assert twice and {r.frame_id for r in twice} == {"f2"}
    assert len({r.task_id for r in twice}) == 1


@pytest.mark.parametrize(("strategy", "wakes"), [("none", False), ("threshold", False),
                                                  ("rate", True)])
async def test_the_gate_is_polled_only_under_the_rate_strategy(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, strategy: str, wakes: bool) -> None:
    """Under any strategy but ``rate`` nothing waits at the gate, so the admission-controller
    does not wake ten times a second to look (its CPU at rest, bench-overhead)."""
    from admission_controller.gate import Gate

    calls: list[float] = []
    release = Gate.release

    def counted(self: Gate[Any], now: float) -> list[tuple[str, Any]]:
        calls.append(now)
        return release(self, now)

    monkeypatch.setattr(Gate, "release", counted)
    env = {**_services_env(tiny_bundle, f"gate-{strategy}"), "OFFRAMP_NODE": "admission-1",
           "OFFRAMP_CONTROL_STRATEGY": strategy, "OFFRAMP_CONTROL_TICK_S": "0.05"}
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(admission_run(load(AdmissionSettings, "OFFRAMP_ADMISSION_", env), stop,
                                     connect=_connect(MemoryBroker())))
        await asyncio.sleep(0.6)
        stop.set()
    assert (len(calls) >= 3) if wakes else not calls, calls


async def test_an_idle_active_admission_controller_does_not_tick(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding the ingest session with no frame in flight and none refused, nothing can
    expire, be lost or be due: the sweeper, the leadership and the refusals wait for their
    event (a frame, another member's heartbeat, a refusal) or a slow tick, where each woke
    twenty or ten times a second (the service's CPU at rest, bench-overhead)."""
    from admission_controller.leadership import Leadership
    from admission_controller.refusals import Refusals
    from admission_controller.tracker import Tracker

    sweeps: list[float] = []
    steps: list[bool] = []
    flushes: list[float] = []
    sweep, step, flush = Tracker.sweep, Leadership.step, Refusals.flush

    def counted_sweep(self: Tracker, now: float, backlog_s: float = 0.0) -> Any:
        sweeps.append(now)
        return sweep(self, now, backlog_s)

    def counted_step(self: Leadership, now: float, wall: float) -> str | None:
        steps.append(self.active)
        return step(self, now, wall)

    async def counted_flush(self: Refusals) -> None:
        flushes.append(time.monotonic())
        await flush(self)

    monkeypatch.setattr(Tracker, "sweep", counted_sweep)
    monkeypatch.setattr(Leadership, "step", counted_step)
    monkeypatch.setattr(Refusals, "flush", counted_flush)
    env = {**_services_env(tiny_bundle, "idle-admission"), "OFFRAMP_NODE": "admission-1"}
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(admission_run(load(AdmissionSettings, "OFFRAMP_ADMISSION_", env), stop,
                                     connect=_connect(MemoryBroker())))
        await asyncio.sleep(1.6)
        stopped = time.monotonic()
        stop.set()
    assert True in steps, "it never held the session"
    assert steps.count(True) <= 4, steps  # one a second, and each of its own decisions
    assert len(sweeps) <= 4, sweeps  # was 32
    assert all(t >= stopped for t in flushes), flushes  # only on the way out; 16 before


@pytest.mark.parametrize("service", ["worker", "scheduler"])
async def test_workers_and_the_scheduler_hear_workers_and_admission_controllers_only(
        tiny_bundle: Bundle, service: str) -> None:
    """A worker's credit, loads and wants, and the scheduler's nodes and source rates, come
    from those two roles; the scheduler's and the arbiter's heartbeats (a quarter of all,
    each decoded at 20-70 us) are not sent to them."""
    heard: list[tuple[str, str]] = []

    class Recording(MemoryBroker):
        def subscribe(self, bus: MemoryBus, topic_filter: str, mqtt_filter: str) -> None:
            heard.append((bus.client_id, topic_filter))
            super().subscribe(bus, topic_filter, mqtt_filter)

    env = {**_services_env(tiny_bundle, "heard"), "OFFRAMP_NODE": f"{service}-1",
           "OFFRAMP_SCHEDULER_BUNDLE": str(tiny_bundle.root)}
    topics = Topics("heard")
    stop = asyncio.Event()
    connect = _connect(Recording())
    async with asyncio.TaskGroup() as tg:
        if service == "worker":
            tg.create_task(worker_run(load(WorkerSettings, "OFFRAMP_WORKER_", env), stop,
                                      connect=connect))
        else:
            tg.create_task(scheduler_run(load(SchedulerSettings, "OFFRAMP_SCHEDULER_", env),
                                         stop, connect=connect))
        last = topics.plan() if service == "worker" else topics.exit_policy(tiny_bundle.name)
        async with asyncio.timeout(30):
            while last not in {f for _, f in heard}:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        stop.set()
    states = {f for _, f in heard if f.startswith(topics.state_all().rsplit("/", 2)[0])}
    assert states == {topics.state_all("worker"), topics.state_all("admission")}, heard


async def test_credit_covers_half_a_second_of_work_not_the_whole_queue(
        engine: tuple[Engine, MemoryBus, Topics]) -> None:
    """A node grants credit for OFFRAMP_WORKER_CREDIT_QUEUE_S of work at the time a sample
    takes through the segments it runs here, not for its whole queue bound: a flood sent at
    once sat in one worker's queue for seconds while the others idled (3 workers at 224x224
    served 84 frames/s of 800 flooded, 94 with this). At least two micro-batches, at most the
    queue bound; a segment not measured yet gets the bound."""
    eng, _, _ = engine
    for _, h in eng.segments.items():  # as before a segment's first timing (loading times one
        h.stats.service_s = 0.0        # batch: slower than 1 ms a sample on a busy machine)
    assert eng.segments.credit_bound(1) == eng.cfg.queue_max
    for k, h in eng.segments.items():
        h.stats.service_s = 0.01 * k  # 10, 20, 30, 40 ms a sample
    through = eng.cfg.run_through  # a micro-batch runs on through the later segments here
    # 0.5 s / 0.1 s (all four) = 5 samples: two micro-batches of 8; or 0.5 s / 10 ms = 50
    assert eng.segments.credit_bound(1) == (16 if through else 50)
    assert eng.segments.credit_bound(4) == 16  # 0.5 s / 40 ms = 13
    for _, h in eng.segments.items():
        h.stats.service_s = 0.0005
    assert eng.segments.credit_bound(1) == (250 if through else 512)  # 0.5 s / 2 ms; the bound
    assert eng.segments.credit_bound(4) == 512
    want = Want(model=eng.model, segment=1, priority=1.0, count=10_000)
    eng.placer.peers.update(Heartbeat(role="admission", node="adm", boot=1.0, wants=(want,)),
                            time.monotonic())
    [load_1] = [s for s in eng.advertiser.loads(time.monotonic()) if s.segment == 1]
    assert load_1.credits["adm"].limit == eng.segments.credit_bound(1)
