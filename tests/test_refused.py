"""Samples a worker cannot take (its queue full, the segment moved away) are reported to
their owner, who dispatches them again at once instead of waiting out the progress timeout."""

from __future__ import annotations

import asyncio

import pytest
from test_in_process import _bundle_ready, _packet

from admission_controller.tracker import Task, Tracker
from offramp.bus import Topics, from_payload
from offramp.bus.memory import MemoryBroker, MemoryBus
from offramp.model.bundle import Bundle
from offramp.node.peers import PeerTable
from offramp.wire import DoneReport, Refused
from segment_worker.engine import Engine, Port
from segment_worker.settings import EngineConfig

pytestmark = pytest.mark.tier("inproc")


def test_a_refused_sample_crosses_the_wire() -> None:
    report = DoneReport(refused=(Refused(task_id="a-1", attempt=2, reason="queue full"),))
    assert DoneReport.decode(report.encode()) == report


async def test_a_full_queue_reports_what_it_turned_away(tiny_bundle: Bundle) -> None:
    """A queue of 4 samples gets a packet of 10: 4 are queued, and the other 6 are reported
    on the source's done topic, each with its attempt and the reason."""
    broker, topics = MemoryBroker(), Topics("eng")
    async with MemoryBus(broker, "w1") as bus:
        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await bus.publish(topic, payload, qos=qos)

        done = await bus.subscribe(topics.done_all(), decode=from_payload(DoneReport.decode))
        cfg = EngineConfig(node="w1", batch_max=8, queue_max=4)
        async with Engine(tiny_bundle, cfg, PeerTable("w1"), Port(topics, publish)) as eng:
            await _bundle_ready(eng, tiny_bundle)
            _, packet = _packet(tiny_bundle, 10)
            assert await eng.accept(packet, 1 << 24) == 4
            report = await asyncio.wait_for(done.get(), 5)
    assert [r.task_id for r in report.refused] == [f"t{i}" for i in range(4, 10)]
    assert all("queue on w1 is full" in r.reason for r in report.refused)
    assert eng.segments.queue_overflow == 6


def test_the_owner_takes_back_only_the_dispatch_that_was_refused() -> None:
    tracker = Tracker(max_in_flight=10, progress_timeout_s=60.0, max_attempts=3)
    task = Task("t1", "cam", "f1", b"png", 0.0, None, None, 1.0)
    tracker.add(task)
    tracker.dispatched(task, 0.0, "w1")
    tracker.dispatched(task, 1.0, "w2")  # sent again since: the first refusal is stale
    assert tracker.refused("t1", 1) is None and task.target == "w2"
    assert tracker.refused("t1", 2) is task and task.target is None  # held by no node now
    assert tracker.refused("t9", 1) is None


async def test_a_frame_no_worker_takes_is_answered_error_after_max_attempts(
        tiny_bundle: Bundle) -> None:
    """The admission-controller in this process, and a worker that refuses every sample it is
    sent (a stand-in: a real one refuses only when its queue is full or the plan moved the
    segment, which credit and timing make hard to hold still). With 2 attempts the frame is
    dispatched twice, refused twice, and answered once, ``error``, naming the worker's reason;
    it does not wait out the progress timeout."""
    from test_in_process import _connect

    from admission_controller.service import run as admission_run
    from admission_controller.settings import AdmissionSettings
    from offramp.local.client import collect, envelope
    from offramp.ml.data import load_digits
    from offramp.settings import load
    from offramp.wire import ActivationPacket, Grant, Heartbeat, SegmentLoad

    broker, topics, stop = MemoryBroker(), Topics("refuse"), asyncio.Event()
    settings = load(AdmissionSettings, "OFFRAMP_ADMISSION_", {
        "OFFRAMP_TOPIC_PREFIX": "refuse", "OFFRAMP_LOG_LEVEL": "warning",
        "OFFRAMP_NODE": "admission-1", "OFFRAMP_HEARTBEAT_S": "0.1",
        "OFFRAMP_ADMISSION_BUNDLE": str(tiny_bundle.root), "OFFRAMP_ADMISSION_MAX_ATTEMPTS": "2",
        "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "60"})
    seen: list[tuple[str, int]] = []

    async def refusing_worker(bus: MemoryBus) -> None:
        admission = await bus.subscribe(topics.state("admission", "admission-1"),
                                        decode=from_payload(Heartbeat.decode))
        packets = await bus.subscribe(topics.act(tiny_bundle.name, 1, "w1"),
                                      decode=from_payload(ActivationPacket.decode))
        boot = (await asyncio.wait_for(admission.get(), 10)).boot
        load_1 = SegmentLoad(model=tiny_bundle.name, segment=1, service_rate=1000.0,
                             credits={"admission-1": Grant(boot=boot, limit=1000)})
        beat = Heartbeat(role="worker", node="w1", boot=1.0, bundle=tiny_bundle.identity,
                         segments=(load_1,))

        async def beats() -> None:
            while True:
                await bus.publish(topics.state("worker", "w1"), beat.encode(), qos=1)
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(beats())
        try:
            async for packet in packets:
                seen.extend((s.task_id, s.attempt) for s in packet.samples)
                report = DoneReport(refused=tuple(
                    Refused(task_id=s.task_id, attempt=s.attempt, reason="queue on w1 is full")
                    for s in packet.samples))
                await bus.publish(topics.done(packet.samples[0].source), report.encode(), qos=1)
        finally:
            beating.cancel()

    image = load_digits().test.images[0]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(admission_run(settings, stop, connect=_connect(broker)))
        try:
            async with MemoryBus(broker, "w1") as worker, MemoryBus(broker, "cam") as cam:
                refusing = tg.create_task(refusing_worker(worker))
                results = await cam.subscribe(topics.results_all(), maxsize=10)
                await asyncio.sleep(0.5)  # the worker's heartbeat is in
                await cam.publish(topics.ingest("cam-1"), envelope("f1", image=image), qos=1)
                got = await collect(results, 1, 10)
                more = await collect(results, 1, 0.5)
                refusing.cancel()
        finally:
            stop.set()
    assert not more.results
    [result] = got.results
    assert (result.frame_id, result.status) == ("f1", "error")
    assert "not taken after 2 dispatches: queue on w1 is full" in (result.error or ""), result
    assert [attempt for _, attempt in seen] == [1, 2] and len({t for t, _ in seen}) == 1


async def test_frames_being_decoded_hold_their_room_while_credit_is_granted(
        tiny_bundle: Bundle) -> None:
    """A first hop's frames are counted as received when their packet arrives and queued only
    once the decode thread has decoded them. A grant round in between must count them, or it
    gives their room away a second time and the next packet overflows the queue (seen under
    2x overload: frames refused as 'queue full' three times and answered error)."""
    import threading
    import time

    from offramp.local.client import png_bytes
    from offramp.ml.data import load_digits
    from offramp.wire import ActivationPacket, Heartbeat, Sample, Want

    broker, topics = MemoryBroker(), Topics("eng")
    async with MemoryBus(broker, "w1") as bus:
        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await bus.publish(topic, payload, qos=qos)

        cfg = EngineConfig(node="w1", batch_max=8, queue_max=4)
        async with Engine(tiny_bundle, cfg, PeerTable("w1"), Port(topics, publish)) as eng:
            await _bundle_ready(eng, tiny_bundle)
            want = Want(model=tiny_bundle.name, segment=1, priority=1.0, count=100)
            eng.placer.peers.update(Heartbeat(role="admission", node="adm", boot=1.0,
                                              wants=(want,)), time.monotonic())

            def granted() -> int:
                [load_1] = [s for s in eng.advertiser.loads(time.monotonic()) if s.segment == 1]
                return load_1.credits["adm"].limit

            assert granted() == 4
            images = load_digits().test.images[:4]
            packet = ActivationPacket(
                model=tiny_bundle.name, segment=1, sender="adm", sender_boot=1.0,
                samples=tuple(Sample(task_id=f"t{i}", source="cam", frame_id=f"f{i}")
                              for i in range(4)),
                inputs=tuple(png_bytes(im) for im in images))
            hold = threading.Event()
            eng.decoder.submit(hold.wait, 10)  # the decode thread is busy until released
            accepting = asyncio.create_task(eng.accept(packet.encode(), 1 << 24))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if eng.segments[1].arriving:
                    break
            assert eng.segments[1].arriving == 4
            assert granted() == 4  # no room given twice
            hold.set()
            assert await accepting == 4
    assert eng.segments.queue_overflow == 0
