"""Samples a worker cannot take (its queue full, the segment moved away) are reported to
their owner, who dispatches them again at once instead of waiting out the progress timeout."""

from __future__ import annotations

import asyncio

from test_in_process import _bundle_ready, _packet

from admission_controller.tracker import Task, Tracker
from offramp.bus import Topics, from_payload
from offramp.bus.memory import MemoryBroker, MemoryBus
from offramp.model.bundle import Bundle
from offramp.node.peers import PeerTable
from offramp.wire import DoneReport, Refused
from segment_worker.engine import Engine
from segment_worker.settings import EngineConfig


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
        async with Engine(tiny_bundle, cfg, topics, PeerTable("w1"), publish) as eng:
            await _bundle_ready(eng, tiny_bundle)
            _, packet = _packet(tiny_bundle, 10)
            assert await eng.accept(packet, 1 << 24) == 4
            report = await asyncio.wait_for(done.get(), 5)
    assert [r.task_id for r in report.refused] == [f"t{i}" for i in range(4, 10)]
    assert all("queue on w1 is full" in r.reason for r in report.refused)
    assert eng.counters.queue_overflow == 6


def test_the_owner_takes_back_only_the_dispatch_that_was_refused() -> None:
    tracker = Tracker(max_in_flight=10, progress_timeout_s=60.0, max_attempts=3)
    task = Task("t1", "cam", "f1", b"png", 0.0, None, None, 1.0)
    tracker.add(task)
    tracker.dispatched(task, 0.0, "w1")
    tracker.dispatched(task, 1.0, "w2")  # sent again since: the first refusal is stale
    assert tracker.refused("t1", 1) is None and task.target == "w2"
    assert tracker.refused("t1", 2) is task and task.target is None  # held by no node now
    assert tracker.refused("t9", 1) is None
