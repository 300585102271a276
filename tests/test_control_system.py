"""Adaptive control end to end: real Mosquitto, real bundle, services as processes.

Overload under every admission strategy, priorities under overload, no herding, node death and
plan changes while frames flow. Capacity is kept small and known by making the workers slower
(``OFFRAMP_WORKER_SLOWDOWN``), which leaves the two CPU cores free for the test itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from offramp.bus import Bus, Topics
from offramp.local import loadgen
from offramp.local.loadgen import Hook, Run, Stream
from offramp.local.system import LocalSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle

# exclusive: every test here runs against the capacity measured alone (and a test that asks
# for it first measures it)
pytestmark = [pytest.mark.tier("broker"), pytest.mark.exclusive]

SLOWDOWN = 30.0
BASE = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "3", "OFFRAMP_RECONNECT_MAX_S": "0.5",
        "OFFRAMP_SCHEDULER_SETTLE_S": "0.5", "OFFRAMP_SCHEDULER_MIN_INTERVAL_S": "0.5",
        "OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "128"}
SLOW = {"OFFRAMP_WORKER_SLOWDOWN": str(SLOWDOWN), "OFFRAMP_WORKER_QUEUE_MAX": "64"}
# For the tests about losing nothing across a death or a re-plan: frames stuck at a dead node
# wait out the progress timeout (3 s) while new ones keep coming, so the in-flight bound must
# cover a few seconds of the offered rate, or the bound (tested under overload) answers some
# of them 'dropped' and the test measures the wrong thing. Capacity differs between machines.
CHURN = {**BASE, "OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "2048"}


@pytest.fixture(scope="module")
def capacity(tiny_bundle: Bundle) -> float:
    """Measured: frames/s two slowed workers serve (exits as calibrated) when offered far
    more, over 6 s."""
    prefix = f"offramp-test/cap-{uuid.uuid4().hex[:8]}"
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=BASE, worker_env=SLOW) as system:
        run = drive(system, [("cam", 300.0, 6.0)])
        system.stop()
    served = sum(1 for r in run.results if r.status == "ok") / 6.0
    assert served > 5, "the system should serve something"
    return served


def drive(system: LocalSystem, streams: list[tuple[str, float, float]], *,
          during: Hook | None = None) -> Run:
    test = load_digits().test
    return asyncio.run(loadgen.drive(system.url, system.prefix, system.workers,
                                     [Stream(*s) for s in streams], test, during=during))


def exactly_once(run: Run) -> Counter[str]:
    per_frame = Counter(r.frame_id for r in run.results)
    assert len(per_frame) == sum(run.offered.values()), "a frame got no result"
    assert set(per_frame.values()) == {1}, "a frame got more than one result"
    return Counter(r.status for r in run.results)


def worker_bounds_held(run: Run, bound: int) -> None:
    loads = [s for hb in run.beats if hb.role == "worker" for s in hb.segments]
    assert loads, "no worker heartbeat seen"
    assert max(s.queued for s in loads) <= bound
    admission = [hb.stats.get("in_flight", 0) for hb in run.beats if hb.role == "admission"]
    assert max(admission) <= 128


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


OVERLOAD_S = 16.0  # long enough for the bounds to be reached and memory to level off


@pytest.mark.parametrize("strategy", ["none", "rate", "threshold"])
def test_overload_at_twice_capacity_answers_every_frame_and_stays_bounded(
        tiny_bundle: Bundle, prefix: str, capacity: float, strategy: str, tmp_path: Path) -> None:
    env = {**BASE, "OFFRAMP_CONTROL_STRATEGY": strategy}
    offered = 2 * capacity
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, worker_env=SLOW,
                     logdir=tmp_path) as system:
        rss: list[float] = []

        async def sample_memory(bus: Bus, run: Run) -> None:
            for _ in range(int(OVERLOAD_S) - 2):
                await asyncio.sleep(1.0)
                assert system.group is not None
                rss.append(max(_rss_mb(m.proc.pid) for m in system.group.members
                               if m.alive and m.proc is not None))

        run = drive(system, [("cam", offered, OVERLOAD_S)], during=sample_memory)
        codes = system.stop()
    status = exactly_once(run)
    worker_bounds_held(run, 64)
    assert max(rss) < 1024 and max(rss[len(rss) // 2:]) < 1.5 * max(rss[:len(rss) // 2]) + 50
    stuck = {n: (tmp_path / f"{n}.log").read_text()[-6000:] for n, c in codes.items() if c != 0}
    assert not stuck, f"{codes}: {stuck}"  # a stuck service left its stacks (SIGABRT) in its log
    ok = status["ok"] / sum(run.offered.values())
    assert status["ok"] > 0.5 * OVERLOAD_S * capacity, status  # overload does not stop the service
    errors = Counter(r.error for r in run.results if r.status == "error")
    assert set(status) <= {"ok", "dropped", "expired"}, (status, errors)
    if strategy == "rate":
        # what is not served is answered 'dropped' at once, about the excess over capacity
        assert status["dropped"] / sum(run.offered.values()) == pytest.approx(1 - ok, abs=0.02)
        assert ok < 0.75
    if strategy == "threshold":
        moved = [r.thresholds for r in run.results if r.status == "ok" and r.thresholds]
        assert len({tuple(t) for t in moved}) > 1, "thresholds should have adapted"


def test_high_priority_source_is_served_first_and_low_still_served(
        tiny_bundle: Bundle, prefix: str, capacity: float, tmp_path: Path) -> None:
    sources = tmp_path / "sources.toml"
    sources.write_text("[sources.urgent]\npriority = 8\n[sources.bulk]\npriority = 1\n")
    env = {**BASE, "OFFRAMP_SOURCES_FILE": str(sources),
           "OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "256"}
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, worker_env=SLOW) as system:
        # Bulk alone overloads the system: batching lets throughput stretch well past what the
        # fixture measured (up to 1.7x here), and a source that does not overload it is served
        # at once and shows no priority. Bulk then waits for credit behind urgent with up to
        # its whole in-flight bound (the default, 256) outstanding; urgent waits for little.
        run = drive(system, [("urgent", 0.6 * capacity, 12.0), ("bulk", 1.5 * capacity, 12.0)])
        system.stop()
    exactly_once(run)
    latency: dict[str, list[float]] = defaultdict(list)
    for r in run.results:
        if r.status == "ok" and r.latency_ms:
            latency[r.source].append(r.latency_ms["total"])
    assert len(latency["bulk"]) > 20, "the low-priority source must still get results"
    urgent, bulk = np.mean(latency["urgent"]), np.mean(latency["bulk"])
    assert urgent < 0.5 * bulk, (urgent, bulk)


def test_many_senders_never_push_the_idle_node_past_its_bound(
        tiny_bundle: Bundle, prefix: str, capacity: float) -> None:
    """Three workers host segment 1 and send to one slow node hosting the rest, whose queue
    bound is 16: it never holds more, and nothing arrives there without credit."""
    env = {**BASE, "OFFRAMP_WORKER_FOLLOW_PLAN": "false"}
    k = tiny_bundle.num_segments
    with LocalSystem(tiny_bundle, 0, prefix=prefix, env=env) as system:
        for i in range(3):
            system.add_worker(f"sender-{i}", (1,), {"OFFRAMP_WORKER_SLOWDOWN": "2"})
        system.add_worker("idle", tuple(range(2, k + 1)),
                          {"OFFRAMP_WORKER_SLOWDOWN": "20", "OFFRAMP_WORKER_QUEUE_MAX": "16"})
        system.workers = 4
        run = drive(system, [("cam", 2 * capacity, 10.0)])
        system.stop()
    status = exactly_once(run)
    assert status["ok"] > 0
    idle = [hb for hb in run.beats if hb.node == "idle" and hb.online]
    assert max(s.queued for hb in idle for s in hb.segments) <= 16
    last = idle[-1].stats
    assert last["queue_overflow"] == 0 and last["without_credit"] == 0, last
    parked = [hb.stats.get("parked", 0) for hb in run.beats if hb.node.startswith("sender")]
    assert max(parked) > 0, "senders should have kept work the idle node could not take"


def test_every_worker_takes_first_hops_under_load(tiny_bundle: Bundle, prefix: str,
                                                  capacity: float) -> None:
    """#26.4: three workers following the plan (the default), offered what two can serve.
    The plan must let all three share the frames: each hosts segment 1 and runs the first
    segment of at least a tenth of them (before, one worker hosted every segment, every
    route went through it, and the others got copies of later segments and idled)."""
    with LocalSystem(tiny_bundle, 3, prefix=prefix, env=BASE, worker_env=SLOW) as system:
        run = drive(system, [("cam", capacity, 8.0)])
        system.stop()
    exactly_once(run)
    assert run.plans, "no plan seen"
    _, last = run.plans[-1]
    assert all(any(r.segment == 1 for r in refs) for refs in last.nodes.values()), last.nodes
    assert set(last.nodes) == {"worker-1", "worker-2", "worker-3"}, last.nodes
    first = Counter(r.nodes[0] for r in run.results if r.status == "ok" and r.nodes)
    served = sum(first.values())
    assert served > 0 and all(first[w] >= 0.1 * served
                              for w in ("worker-1", "worker-2", "worker-3")), first


def test_node_death_gives_a_new_plan_quickly_and_every_frame_is_answered(
        tiny_bundle: Bundle, prefix: str, capacity: float) -> None:
    with LocalSystem(tiny_bundle, 3, prefix=prefix, env=CHURN, worker_env=SLOW) as system:
        killed_at: list[float] = []

        async def kill(bus: Bus, run: Run) -> None:
            await asyncio.sleep(3.0)
            system.member("worker-2").signal(signal.SIGKILL)
            killed_at.append(time.monotonic())

        run = drive(system, [("cam", 0.5 * capacity, 8.0)], during=kill)
        system.stop()
    status = exactly_once(run)
    assert set(status) == {"ok"}, status
    after = [(t, p) for t, p in run.plans if t > killed_at[0]]
    assert after, "no plan after the node died"
    t, plan = after[0]
    assert t - killed_at[0] < 4 * 0.25 + 0.5 + 0.5, "re-plan took longer than a few heartbeats"
    assert "worker-2" not in plan.nodes and plan.reason == "node-lost"


def test_plan_changes_while_running_lose_nothing_and_answer_nothing_twice(
        tiny_bundle: Bundle, prefix: str, capacity: float) -> None:
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=CHURN, worker_env=SLOW) as system:

        async def churn(bus: Bus, run: Run) -> None:
            topics = Topics(system.prefix)
            await asyncio.sleep(2.0)
            system.add_worker("worker-3", (1,))  # joins: a new plan
            await asyncio.sleep(3.0)
            await bus.publish(topics.source("vip"), b'{"priority": 9, "rate_hz": 40}', qos=1,
                              retain=True)  # a new important source: another plan
            await asyncio.sleep(3.0)
            await bus.publish(topics.source("vip"), b"", qos=1, retain=True)

        run = drive(system, [("cam", 0.5 * capacity, 10.0)], during=churn)
        logs = system.logs(tail=200_000)
        system.stop()
    status = exactly_once(run)
    assert set(status) == {"ok"}, status
    reasons = [p.reason for _, p in run.plans]
    assert "node-joined" in reasons and "sources" in reasons, reasons
    assert "plan_followed" in logs
