"""Pure policies, no I/O: exit rules, micro-batching, offloading, ownership, segment splits."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from admission_controller.tracker import Task, Tracker
from offramp.local.system import split_segments
from offramp.policy.exits import Deadlines, decide
from offramp.policy.offload import Candidate, choose
from offramp.wire import Sample
from segment_worker.queue import Item, SegmentQueue

SURE, UNSURE = [8.0, 0.0, 0.0], [0.1, 0.0, 0.0]


def test_confident_samples_exit_and_the_rest_continue_within_one_batch() -> None:
    d = decide("confidence", 0.9, np.array([SURE, UNSURE, SURE]))
    assert d.exits.tolist() == [True, False, True]
    assert d.reasons == ["threshold", "", "threshold"]
    assert d.labels.tolist() == [0, 0, 0] and d.confidence[0] > 0.99


def test_closed_exits_and_the_final_exit() -> None:
    assert not decide("confidence", None, np.array([SURE])).exits.any()
    last = decide("confidence", None, np.array([UNSURE, SURE]), last=True)
    assert last.exits.all() and last.reasons == ["final", "final"]


def test_deadline_rule_exits_samples_that_would_miss_their_deadline() -> None:
    deadlines = np.array([10.5, math.nan, 20.0])
    d = decide("confidence", 0.99, np.array([UNSURE, UNSURE, UNSURE]),
               deadlines=Deadlines(deadlines, now=10.0, to_next_s=1.0))
    assert d.exits.tolist() == [True, False, False]
    assert d.reasons[0] == "deadline"


def test_feature_difference_criterion_uses_the_previous_embedding() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    prev = np.array([[1.0, 0.0], [1.0, 0.0]])
    d = decide("feature-difference", 0.9, np.array([UNSURE, UNSURE]), emb, prev)
    assert d.exits.tolist() == [True, False] and d.reasons[0] == "feature-difference"


def _item(i: int) -> Item:
    return Item(Sample(task_id=f"t{i}", source="s", frame_id=f"f{i}"), np.zeros(2, np.float32), None, 0.0)


async def test_micro_batch_fills_up_to_max_or_leaves_after_the_wait() -> None:
    q = SegmentQueue(maxsize=10)
    rejected = q.push([_item(i) for i in range(12)])
    assert [it.sample.task_id for it in rejected] == ["t10", "t11"]
    assert q.overflow == 2
    assert [it.sample.task_id for it in await q.batch(4, 0.0)] == ["t0", "t1", "t2", "t3"]
    q.drain()
    q.push([_item(0)])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    batch = await q.batch(8, 0.05)
    assert len(batch) == 1 and loop.time() - t0 >= 0.04
    q.push([_item(1)])
    asyncio.get_running_loop().call_later(0.01, q.push, [_item(i) for i in range(2, 4)])
    assert len(await q.batch(3, 1.0)) == 3


def test_offload_picks_the_least_total_cost_with_hysteresis_and_staleness() -> None:
    local = Candidate("me", backlog_s=0.010, service_s=0.002, local=True)
    fast = Candidate("n1", backlog_s=0.0, service_s=0.002, rtt_s=0.001)
    assert choose([local, fast], 1000).node == "n1"
    near = Candidate("n2", backlog_s=0.009, service_s=0.002)
    assert choose([local, near], 1000, margin_s=0.002).node == "me"
    stale = Candidate("n3", backlog_s=0.0, service_s=0.0, age_s=5.0)
    assert choose([local, stale], 1000).node == "me"
    assert choose([stale], 1000) is None
    slow_link = Candidate("n4", backlog_s=0.0, service_s=0.002, link_bytes_per_s=1e6)
    assert choose([local, slow_link], 100_000).node == "me"  # 0.1 s on the wire


def _task(i: int, source: str = "cam", deadline: float | None = None) -> Task:
    return Task(f"t{i}", source, f"f{i}", np.zeros(1), created=0.0, deadline=deadline)


def test_tracker_answers_each_task_once_and_bounds_sources() -> None:
    tr = Tracker(max_in_flight=2, progress_timeout_s=1.0, max_attempts=2)
    tr.add(_task(1))
    tr.add(_task(2))
    assert not tr.can_admit("cam") and tr.can_admit("other")
    assert tr.complete("t1") is not None
    assert tr.complete("t1") is None and tr.duplicates == 1
    assert tr.can_admit("cam")


def test_tracker_redispatches_stalled_tasks_then_gives_up_and_expires() -> None:
    tr = Tracker(max_in_flight=10, progress_timeout_s=1.0, max_attempts=2)
    a, b = _task(1), _task(2, deadline=5.0)
    for t in (a, b):
        tr.add(t)
        tr.dispatched(t, 0.0, "w1")
    assert tr.lost("w1") == [a, b] and tr.lost("w2") == []
    sweep = tr.sweep(1.5)
    assert sweep.redispatch == [a, b] and not sweep.failed
    for t in sweep.redispatch:
        tr.dispatched(t, 1.5, "w2")
    sweep = tr.sweep(3.0)
    assert sweep.failed == [a, b]
    assert len(tr) == 0
    c = _task(3, deadline=4.0)
    tr.add(c)
    assert tr.sweep(4.0).expired == [c]


@pytest.mark.parametrize(("flops", "workers", "expected"), [
    ([10, 10, 10, 10], 2, [(1, 2), (3, 4)]),
    ([30, 5, 5, 20], 2, [(1,), (2, 3, 4)]),
    ([1, 1, 1, 1], 1, [(1, 2, 3, 4)]),
    ([4, 2, 2, 4], 3, [(1,), (2, 3), (4,)]),
    ([5, 5], 3, [(1,), (2,), (1,)]),
])
def test_split_segments_is_contiguous_and_balanced(flops: list[int], workers: int,
                                                   expected: list[tuple[int, ...]]) -> None:
    assert split_segments(flops, workers) == expected
