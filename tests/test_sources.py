"""Per-source state is bounded: a client that names a new source for every frame grows
neither the admission-controller's tables, nor its metrics, nor its heartbeat, and every
frame is still answered."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter

import pytest
from sharing import port_base

from admission_controller.gate import Gate
from admission_controller.sources import SourceTable, Tracked
from admission_controller.tracker import Task, Tracker
from offramp.bus import Topics, from_payload
from offramp.local.broker import free_run
from offramp.local.client import collect, png_bytes, wait_for_workers
from offramp.local.inprocess import InProcessSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.policy.admission import ControlSettings
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


async def test_a_hundred_thousand_source_names_leave_tables_metrics_and_heartbeat_bounded(
        tiny_bundle: Bundle) -> None:
    """100,000 frames, each from a source of its own, against a table of 40 sources that an
    idle source leaves after 0.3 s, on the in-process system: every frame gets one answer
    (``ok``; ``error`` naming the source limit while all 40 are busy; ``dropped`` beyond the
    ingest queue, as the cameras send faster than it reads), the evictions are
    counted, and the tables, the metrics page and the heartbeat name at most 40 and 16
    sources."""
    frames = 100_000
    http = free_run(5, port_base(19500))
    env = {"OFFRAMP_ADMISSION_MAX_SOURCES": "40", "OFFRAMP_ADMISSION_SOURCE_IDLE_S": "0.3",
           "OFFRAMP_ADMISSION_HEARTBEAT_SOURCES": "16", "OFFRAMP_ADMISSION_ANSWERS_KEPT": "5000"}
    png = png_bytes(load_digits().test.images[0])
    async with InProcessSystem(tiny_bundle, 1, env=env, http_base=http) as system:
        topics = Topics(system.prefix)
        async with system.client("cameras") as cams:
            await wait_for_workers(cams, topics, 1, 30)
            results = await cams.subscribe(topics.results_all(), maxsize=2 * frames)
            states = await cams.subscribe(topics.state("admission", "admission-1"),
                                          maxsize=1024, decode=from_payload(Heartbeat.decode))
            for i in range(frames):
                await cams.publish(topics.ingest(f"cam-{i}"), png, qos=1)
                if i % 100 == 0:  # the services' turn: here they share this event loop
                    await asyncio.sleep(0.002)
            got = await collect(results, frames, 240)  # about 35 s alone on 2 cores
            while states.get_nowait() is not None:  # one sent after the last answer
                pass
            heartbeat = await asyncio.wait_for(states.get(), 5)
        port = http + [m.node for m in system.members].index("admission-1")
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    per_source = Counter(r.source for r in got.results)
    assert len(per_source) == frames and set(per_source.values()) == {1}
    status = Counter(r.status for r in got.results)
    assert status["ok"] > 0 and set(status) <= {"ok", "error", "dropped"}, status
    errors = Counter((r.error or "")[:120] for r in got.results if r.status == "error")
    assert all("OFFRAMP_ADMISSION_MAX_SOURCES" in e for e in errors), errors
    # the cameras publish faster than the controller reads: beyond its ingest queue, shed
    assert {r.error for r in got.results if r.status == "dropped"} <= {"ingest queue full"}
    assert heartbeat.stats["sources_evicted"] > 0 and heartbeat.stats["sources"] <= 40
    assert heartbeat.stats["answers_kept"] <= 5000 and heartbeat.stats["in_flight"] == 0
    assert 0 < len(heartbeat.arrivals) <= 16 and len(heartbeat.encode()) < 8192
    named = set(re.findall(r'source="([^"]+)"', metrics))
    assert len(named) <= 40 + 2, len(named)  # and (untracked), (invalid)
