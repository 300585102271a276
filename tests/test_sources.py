"""Per-source state is bounded: a client that names a new source for every frame grows
neither the admission-controller's tables, nor its metrics, nor its heartbeat, and every
frame is still answered."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from collections import Counter

import pytest

from admission_controller.gate import Gate
from admission_controller.sources import SourceTable, Tracked
from admission_controller.tracker import Task, Tracker
from offramp.bus import Bus, Topics, from_payload
from offramp.local.broker import free_run
from offramp.local.client import collect, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.policy.admission import ControlSettings
from offramp.settings import BusSettings
from offramp.wire import Heartbeat

pytestmark = pytest.mark.tier("inproc")


def test_a_new_source_takes_the_place_of_the_one_idle_longest_or_is_refused() -> None:
    table = SourceTable(max_sources=2, idle_s=10.0)
    busy: set[str] = set()
    assert table.track("a", 0.0, busy.__contains__) == Tracked(True)
    assert table.track("b", 1.0, busy.__contains__) == Tracked(True)
    assert table.track("a", 2.0, busy.__contains__) == Tracked(True)  # a is fresh again
    assert table.track("c", 5.0, busy.__contains__) == Tracked(False)  # b idle 4 s only
    assert table.track("c", 11.0, busy.__contains__) == Tracked(True, evicted="b")
    busy.add("a")  # idle for long, but a frame of it is still in flight
    assert table.track("d", 30.0, busy.__contains__) == Tracked(False)
    busy.clear()
    assert table.track("d", 30.0, busy.__contains__) == Tracked(True, evicted="a")
    assert (len(table), table.evicted, table.refused) == (2, 2, 2)
    assert "d" in table and "a" not in table


def test_the_tracker_keeps_no_count_for_a_source_without_frames_in_flight() -> None:
    tracker = Tracker(max_in_flight=4, progress_timeout_s=5.0, max_attempts=3)
    for i in range(1000):
        assert tracker.can_admit(f"cam-{i}") and tracker.in_flight(f"cam-{i}") == 0
        tracker.add(Task(f"t{i}", f"cam-{i}", f"f{i}", None, 0.0, None, None, 1.0))
        tracker.complete(f"t{i}")
    assert tracker.counted_sources() == []


def test_the_gate_says_the_most_active_sources_in_a_heartbeat() -> None:
    gate: Gate[int] = Gate(ControlSettings())
    for i in range(100):
        for _ in range(i % 7 + 1):
            gate.offer(f"cam-{i}", i, 0.0)
    arrivals = gate.arrivals(limit=5)
    assert len(arrivals) == 5 and set(arrivals.values()) == {7.0}
    assert {k.split(":", 1)[1] for k in gate.stats(limit=5)} == set(arrivals)
    assert len(gate.arrivals()) == 100
    gate.forget("cam-6")
    assert "cam-6" not in gate.sources() and gate.waiting("cam-6") == 0


def test_a_new_source_for_every_frame_leaves_tables_metrics_and_heartbeat_bounded(
        tiny_bundle: Bundle, prefix: str) -> None:
    """1,500 frames, each from a source of its own, against a table of 40 sources that an
    idle source leaves after 0.3 s: every frame gets one answer (``ok``, or ``error`` naming
    the source limit while all 40 are busy), the evictions are counted, and the metrics page
    and the heartbeat name at most 40 and 16 sources."""
    frames = 1500
    http = free_run(6, 19500)
    env = {"OFFRAMP_ADMISSION_MAX_SOURCES": "40", "OFFRAMP_ADMISSION_SOURCE_IDLE_S": "0.3",
           "OFFRAMP_ADMISSION_HEARTBEAT_SOURCES": "16"}
    from test_system import _frames

    _, payloads = _frames(frames % 300 or 300)
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, http_base=http) as system:
        topics = Topics(prefix)

        async def run() -> tuple[list, Heartbeat]:
            async with Bus(BusSettings(broker_url=system.url, topic_prefix=prefix),
                           f"test-sources-{os.getpid()}") as bus:
                await bus.wait_connected(10)
                await wait_for_workers(bus, topics, 2, 60)
                results = await bus.subscribe(topics.results_all(), qos=1, maxsize=100_000)
                states = await bus.subscribe(topics.state_all("admission"), maxsize=1024,
                                             decode=from_payload(Heartbeat.decode))
                for i in range(frames):
                    await bus.publish(topics.ingest(f"cam-{i}"), payloads[i % len(payloads)],
                                      qos=1)
                    await asyncio.sleep(1 / 400)
                got = await collect(results, frames, 60)
                await asyncio.sleep(1.0)  # a heartbeat after the last frame
                while (hb := states.get_nowait()) is not None:
                    latest = hb
                return got.results, latest

        results, heartbeat = asyncio.run(run())
        port = system.http_ports()["admission-1"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            metrics = page.read().decode()
        system.stop()
    per_frame = Counter(r.source for r in results)
    assert len(per_frame) == frames and set(per_frame.values()) == {1}
    status = Counter(r.status for r in results)
    assert status["ok"] > 0 and set(status) <= {"ok", "error"}, status
    assert all("OFFRAMP_ADMISSION_MAX_SOURCES" in (r.error or "")
               for r in results if r.status == "error")
    assert heartbeat.stats["sources_evicted"] > 0 and heartbeat.stats["sources"] <= 40
    assert 0 < len(heartbeat.arrivals) <= 16
    named = set(re.findall(r'source="([^"]+)"', metrics))
    assert len(named) <= 40 + 2, len(named)  # and (untracked), (invalid)
