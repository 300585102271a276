"""Adaptive control without I/O: queue discipline, credits, placement, admission, the plan,
the source registry."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from admission_controller.gate import Gate
from offramp.errors import SettingsError, WireError
from offramp.node.sources import SourceRegistry, SourceSettings
from offramp.policy.admission import (
    ControlSettings,
    RateController,
    TokenBucket,
    adapt_thresholds,
    path_backlog,
)
from offramp.policy.credits import CreditLedger, Demand, Request, SendWindow
from offramp.policy.offload import Candidate, place
from offramp.policy.plan import ModelInfo, NodeInfo, SourceLoad, plan
from offramp.wire import Sample
from segment_worker.queue import Item, SegmentQueue


def _item(task: str, priority: float, arrived: float) -> Item:
    return Item(Sample(task_id=task, source="s", frame_id=task,
                       priority=priority), np.zeros(2, np.float32), None, arrived)


# -- queue discipline (3.2) --------------------------------------------------------------------
def test_higher_priority_overtakes_queued_lower_priority() -> None:
    q = SegmentQueue(100, ageing_s=1.0)
    q.push([_item(f"low{i}", 1.0, 100.0) for i in range(5)])
    q.push([_item("high", 4.0, 100.1)])
    assert [it.sample.task_id for it in q.pop(2, now=100.2)] == ["high", "low0"]


def test_low_priority_is_never_starved() -> None:
    """A steady stream of fresh high-priority work: the old low-priority item still gets
    served once its age makes it more urgent (after tau * (4/1 - 1) = 3 s here)."""
    q = SegmentQueue(1000, ageing_s=1.0)
    q.push([_item("old-low", 1.0, 0.0)])
    served_at = None
    for step in range(100):
        now = 0.1 * step
        q.push([_item(f"h{step}", 4.0, now)])
        if q.pop(1, now=now)[0].sample.task_id == "old-low":
            served_at = now
            break
    assert served_at is not None and 2.9 <= served_at <= 3.2


def test_full_queue_lets_higher_priority_evict_the_newest_lowest() -> None:
    q = SegmentQueue(3)
    q.push([_item("a", 1.0, 0), _item("b", 1.0, 0), _item("c", 2.0, 0)])
    rejected = q.push([_item("vip", 4.0, 0), _item("low", 1.0, 0)])
    assert [it.sample.task_id for it in rejected] == ["b", "low"]
    assert len(q) == 3 and q.overflow == 2
    assert q.by_priority() == ((4.0, 1), (2.0, 1), (1.0, 1))


# -- credits (3.3) -----------------------------------------------------------------------------
def test_many_senders_never_push_a_node_past_its_bound() -> None:
    """N senders, each greedy, each told the same grants: the receiver's queue plus what is
    still on its way never exceeds the bound, over many random rounds."""
    rng = random.Random(7)
    bound = 64
    ledger = CreditLedger(bound)
    senders = {f"s{i}": SendWindow(f"s{i}", boot=1.0) for i in range(8)}
    queued, in_flight = 0, []
    for rnd in range(300):
        reqs = [Request(n, 1.0, rng.choice([1.0, 2.0]), rng.randint(0, 40)) for n in senders]
        grants = ledger.grant(queued, reqs, now=float(rnd))
        for name, win in senders.items():
            free = win.available("r", 5.0, "m", 2, grants.get(name))
            n = rng.randint(0, free)  # a sender may use any part of its credit
            if n:
                win.spend("r", 5.0, "m", 2, n)
                in_flight.append((name, n))
        rng.shuffle(in_flight)
        arrive, in_flight = in_flight[: len(in_flight) // 2], in_flight[len(in_flight) // 2:]
        for name, n in arrive:
            assert ledger.received(name, 1.0, n, float(rnd))
            queued += n
        assert queued + sum(n for _, n in in_flight) <= bound
        queued -= min(queued, rng.randint(0, 20))  # the node serves some


def test_a_restarted_sender_or_receiver_starts_from_zero() -> None:
    ledger = CreditLedger(10)
    grants = ledger.grant(0, [Request("s", 1.0, 1.0, 10)], now=0)
    win = SendWindow("s", boot=1.0)
    assert win.available("r", 5.0, "m", 1, grants["s"]) == 10
    win.spend("r", 5.0, "m", 1, 10)
    assert win.available("r", 5.0, "m", 1, grants["s"]) == 0
    assert win.available("r", 6.0, "m", 1, grants["s"]) == 10  # the receiver restarted
    assert SendWindow("s", boot=2.0).available("r", 5.0, "m", 1, grants["s"]) == 0  # not mine
    ledger.received("s", 1.0, 10, now=0)
    grants = ledger.grant(10, [Request("s", 2.0, 1.0, 10)], now=1)  # new boot, queue full
    assert grants["s"].boot == 2.0 and grants["s"].limit == 0


def test_credit_spent_on_lost_packets_is_written_off_after_the_lease() -> None:
    ledger = CreditLedger(10, lease_s=2.0)
    ledger.grant(0, [Request("s", 1.0, 1.0, 10)], now=0)
    ledger.received("s", 1.0, 4, now=0.1)
    ledger.reported("s", 1.0, 10, now=0.2)  # it sent 10; 6 never arrive
    assert ledger.outstanding() == 6
    ledger.grant(4, [], now=1.0)
    assert ledger.outstanding() == 6
    ledger.grant(4, [], now=3.0)
    assert ledger.outstanding() == 0


def test_grants_go_to_higher_priority_first_and_are_shared() -> None:
    ledger = CreditLedger(12)
    grants = ledger.grant(0, [Request("lo", 1.0, 1.0, 100), Request("hi", 1.0, 5.0, 4),
                              Request("mid", 1.0, 2.0, 100)], now=0)
    assert grants["hi"].limit == 4
    assert grants["mid"].limit == 4  # at most bound / senders outstanding each
    assert grants["lo"].limit == 4
    assert ledger.grant(0, [Request("lo", 1.0, 1.0, 100)], now=1)["lo"].limit == 4  # full


def test_credit_is_due_early_when_a_waiting_sender_can_get_a_batch() -> None:
    """A receiver sends its heartbeat early only when it matters: a sender is nearly out of
    credit and the queue has room for a micro-batch (or for all the sender asks for)."""
    ledger = CreditLedger(128)
    wants = [Request("s", 1.0, 1.0, 1000)]
    assert ledger.grant(0, wants, now=0)["s"].limit == 128
    assert not ledger.due(0, wants, 32)  # all 128 still on their way: the sender has credit
    ledger.received("s", 1.0, 128, now=0)
    assert not ledger.due(128, wants, 32)  # full queue: nothing to give
    assert not ledger.due(112, wants, 32)  # room for less than a batch
    assert ledger.due(96, wants, 32)  # one batch left the queue
    assert not ledger.due(96, [], 32)  # nobody asks
    assert ledger.grant(96, wants, now=1)["s"].limit == 160  # due() granted nothing itself
    assert not ledger.due(64, wants, 32)  # the sender holds a batch of credit already

    small = CreditLedger(128)
    assert small.due(120, [Request("t", 1.0, 1.0, 5)], 32)  # all it asks for fits
    assert small.due(0, [Request("new", 2.0, 1.0, 40)], 32)  # a sender not seen before


def test_demand_asks_for_two_periods_of_flow_plus_what_waits() -> None:
    demand: Demand[int] = Demand(period_s=0.25, start=0.0)
    demand.add(1, 50)
    assert demand.wants({}, now=0.25) == {1: 100}  # 200/s for 2 x 0.25 s
    demand.add(1, 5)
    assert demand.wants({1: 10}, now=0.3) == {1: 110}  # an early beat: same flow, + waiting
    assert not demand.untold(1, 110)
    assert demand.untold(1, 111)  # more waits than the last heartbeat asked for
    demand.add(1, 25)
    assert demand.wants({}, now=0.75) == {1: 30}  # 30 over 0.5 s: 60/s
    assert demand.wants({2: 3}, now=2.0) == {2: 3}  # nothing flowed since: only the waiting


# -- placement (1.3 / 3.1) ---------------------------------------------------------------------
def test_placement_respects_credit_and_keeps_the_rest() -> None:
    busy = Candidate("busy", backlog_s=0.5, service_s=0.01, credit=100)
    idle = Candidate("idle", backlog_s=0.0, service_s=0.01, credit=3)
    p = place([busy, idle], 10, 1000)
    assert p.parts == (("idle", 3), ("busy", 7)) and p.kept == 0
    p = place([Candidate("idle", 0.0, 0.01, credit=3)], 10, 1000)
    assert p.parts == (("idle", 3),) and p.kept == 7
    assert place([Candidate("x", 0.0, 0.01, credit=0)], 5, 10).kept == 5


def test_stale_neighbours_are_used_only_as_the_plans_choice() -> None:
    stale = Candidate("planned", 0.0, 0.01, age_s=10.0, credit=5)
    other = Candidate("other", 0.0, 0.01, age_s=10.0, credit=5)
    assert place([stale, other], 4, 10).kept == 4
    assert place([stale, other], 4, 10, fallback="planned").parts == (("planned", 4),)


def test_priority_aware_cost_counts_only_work_ahead() -> None:
    """The same node is cheap for a high-priority task (little high-priority work queued)
    and expensive for a low one: PeerTable builds backlog_s from queued_at_or_above."""
    from offramp.node.peers import PeerTable
    from offramp.wire import Heartbeat, SegmentLoad

    load = SegmentLoad(model="m", segment=2, queued=100, service_rate=100.0,
                       by_priority=((4.0, 2), (1.0, 98)))
    assert load.queued_at_or_above(4.0) == 2
    assert load.queued_at_or_above(1.0) == 100
    peers = PeerTable()
    first = SegmentLoad(model="m", segment=1, queued=0, service_rate=100.0)
    peers.update(Heartbeat(role="worker", node="busy", segments=(first, load)))
    peers.update(Heartbeat(role="worker", node="gone", segments=(first,)), now=time.monotonic() - 10)
    # Q_path input: per segment, each fresh host's wait ahead plus one service (0.01 s)
    assert peers.segment_backlogs("m", 2, 1.0, priority=4.0) == \
        [[pytest.approx(0.01)], [pytest.approx(0.03)]]
    assert peers.segment_backlogs("m", 2, 1.0, priority=1.0)[1] == [pytest.approx(1.01)]
    assert path_backlog(peers.segment_backlogs("m", 3, 1.0)) == pytest.approx(1.02)


# -- admission (1.4) ---------------------------------------------------------------------------
def test_rate_adaptation_settles_where_rate_times_backlog_is_v() -> None:
    s = ControlSettings(strategy="rate", v=10.0, eta=0.3, rate_max=1000.0)
    ctl = RateController(s)
    capacity = 200.0
    for _ in range(200):
        backlog = 0.5 if ctl.rate > capacity else ctl.rate / capacity * 0.02
        ctl.update(backlog)
    assert 20 < ctl.rate < capacity * 1.1
    assert RateController(s).update(0.0) == pytest.approx(1000.0)  # no backlog: up to the max


def test_token_bucket_admits_the_rate() -> None:
    bucket = TokenBucket(100.0, 0.05, now=0.0)
    admitted = sum(bucket.take(i * 0.001) for i in range(1000))  # 1000 frames over 1 s
    assert 100 <= admitted <= 106


def test_gate_drops_above_rate_or_buffers_by_setting() -> None:
    s = ControlSettings(strategy="rate", rate_max=10.0, burst_s=0.1)
    gate: Gate[int] = Gate(s)
    verdicts = [gate.offer("cam", i, now=0.0) for i in range(5)]
    assert verdicts == ["admit", "drop", "drop", "drop", "drop"]
    buffered: Gate[int] = Gate(ControlSettings(strategy="rate", rate_max=10.0, burst_s=0.1,
                                               buffer=2))
    assert [buffered.offer("cam", i, 0.0) for i in range(4)] == ["admit", "wait", "wait", "drop"]
    assert buffered.release(0.15) == [("cam", 1)]
    assert Gate[int](ControlSettings()).offer("cam", 1, 0.0) == "admit"  # strategy none


def test_thresholds_fall_with_backlog_within_floor_and_ceiling() -> None:
    s = ControlSettings(eps_t=1.0, q_ref_s=0.05)
    floor, ceiling = (0.5, 0.6), (0.9, 0.95)
    t = adapt_thresholds((0.9, 0.95), 1.05, s, floor, ceiling, dt_s=0.1)
    assert t == pytest.approx((0.8, 0.85))
    for _ in range(50):
        t = adapt_thresholds(t, 5.0, s, floor, ceiling, dt_s=0.1)
    assert t == floor
    for _ in range(200):  # below Q_ref they rise again, slowly (0.005 per tick here)
        t = adapt_thresholds(t, 0.0, s, floor, ceiling, dt_s=0.1)
    assert t == ceiling
    assert path_backlog([[0.3, 0.1], [], [0.2]]) == pytest.approx(0.3)


def test_closed_exits_open_from_the_top_of_the_score_range_and_close_at_once() -> None:
    """A closed ceiling (2: never) is not a distance to walk: one tick of backlog opens the
    exits just below 1, and rising past 1 closes them again in one step."""
    s = ControlSettings(eps_t=1.0, q_ref_s=0.05)
    floor, closed = (0.4, 0.3), (2.0, 2.0)
    assert adapt_thresholds(closed, 0.0, s, floor, closed, dt_s=0.1) == closed
    t = adapt_thresholds(closed, 1.05, s, floor, closed, dt_s=0.1)
    assert t == pytest.approx((0.9, 0.9))
    t = adapt_thresholds(t, 0.0, s, floor, closed, dt_s=0.1)
    assert t == pytest.approx((0.905, 0.905))
    t = adapt_thresholds((0.999, 0.999), 0.0, s, floor, closed, dt_s=0.1)
    assert t == closed


# -- the plan (3.4) ----------------------------------------------------------------------------
MODEL = ModelInfo("m", [100, 100, 100], [1000, 1000, 0], [1.0, 0.6, 0.3])


def _nodes(*speeds: float, max_segments: int = 0) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", s, frozenset({1, 2, 3}), max_segments, 1e6, 0.002)
            for i, s in enumerate(speeds, start=1)]


def test_the_important_source_gets_the_fast_node() -> None:
    alloc = plan(MODEL, _nodes(1000.0, 4000.0, 2000.0),
                 [SourceLoad("low", 1.0, 5.0), SourceLoad("high", 4.0, 5.0)])
    assert set(alloc.routes["high"].values()) == {"n2"}
    assert alloc.expected_s["high"] <= alloc.expected_s["low"]
    for k in (1, 2, 3):
        assert any(k in segs for segs in alloc.nodes.values())


def test_plan_respects_capacity_and_gives_idle_nodes_work() -> None:
    alloc = plan(MODEL, _nodes(1000.0, 1000.0, 1000.0, max_segments=1),
                 [SourceLoad("cam", 1.0, 3.0)])
    assert all(len(segs) == 1 for segs in alloc.nodes.values())
    assert sorted(k for segs in alloc.nodes.values() for k in segs) == [1, 2, 3]
    many = plan(MODEL, _nodes(1000.0, 1000.0, 1000.0, 1000.0), [SourceLoad("cam", 1.0, 3.0)])
    assert sorted(many.nodes) == ["n1", "n2", "n3", "n4"]
    assert all(many.nodes.values()), many.nodes  # nobody idles: the fourth holds a replica
    assert sorted({k for segs in many.nodes.values() for k in segs}) == [1, 2, 3]
    assert plan(MODEL, [], [SourceLoad("cam", 1.0, 1.0)]).routes == {}


def test_plans_are_sticky_between_near_equal_nodes() -> None:
    first = plan(MODEL, _nodes(1000.0, 1050.0), [SourceLoad("cam", 1.0, 2.0)])
    assert set(first.routes["cam"].values()) == {"n2"}  # a little faster
    again = plan(MODEL, _nodes(1050.0, 1000.0), [SourceLoad("cam", 1.0, 2.0)],
                 current=first.nodes)
    # n1 is now a little faster: not worth loading anything anywhere
    assert all(again.nodes[n] <= first.nodes[n] for n in again.nodes), (first.nodes, again.nodes)
    moved = plan(MODEL, _nodes(3000.0, 1000.0), [SourceLoad("cam", 1.0, 2.0)],
                 current=first.nodes)
    assert set(moved.routes["cam"].values()) == {"n1"}  # much faster: move


def test_overload_spreads_a_source_over_nodes() -> None:
    """At a rate one node cannot carry, the M/M/1 term pushes later sources elsewhere."""
    alloc = plan(MODEL, _nodes(1000.0, 1000.0), [SourceLoad("a", 2.0, 6.0),
                                                 SourceLoad("b", 1.0, 6.0)])
    assert set(alloc.routes["a"].values()) != set(alloc.routes["b"].values())


# -- source registry ---------------------------------------------------------------------------
def test_registry_from_file_and_messages(tmp_path: Path) -> None:
    f = tmp_path / "sources.toml"
    f.write_text('[sources.gate]\npriority = 4\ndeadline_ms = 200\nrate_hz = 30\n')
    reg = SourceRegistry(SourceSettings(file=str(f), unknown="reject"))
    gate = reg.lookup("gate")
    assert gate is not None and gate.priority == 4.0 and gate.deadline_s == pytest.approx(0.2)
    assert reg.lookup("yard") is None
    reg.update("yard", b'{"priority": 2}')
    assert reg.lookup("yard").priority == 2.0  # type: ignore[union-attr]
    reg.update("yard", b"")
    assert reg.lookup("yard") is None
    for bad in (b"not json", b'{"priority": -1}', b'{"prio": 1}', b'[1]'):
        with pytest.raises(WireError):
            reg.update("yard", bad)
    assert SourceRegistry(SourceSettings()).lookup("any").priority == 1.0  # type: ignore[union-attr]


@pytest.mark.parametrize("text, words", [
    ("[sources.a]\npriority = 'high'\n", "priority"),
    ("[sources.a]\nspeed = 1\n", "unknown keys"),
    ("[other]\n", r"only \[sources"),
    ("not toml ==", "OFFRAMP_SOURCES_FILE"),
])
def test_bad_source_files_get_one_clear_error(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(SettingsError, match=words):
        SourceRegistry(SourceSettings(file=str(f)))
    with pytest.raises(SettingsError, match="no such file"):
        SourceRegistry(SourceSettings(file=str(tmp_path / "missing.toml")))
