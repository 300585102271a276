"""The bounded inbox on its own: order, overflow policies, drop callbacks, waiting."""

from __future__ import annotations

import asyncio

import pytest

from offramp.bus.inbox import Inbox, RateLimitedWarning

pytestmark = pytest.mark.tier("inproc")


def test_drop_oldest_keeps_the_newest_and_reports_each_drop() -> None:
    dropped: list[int] = []
    box: Inbox[int] = Inbox("t", 3, "drop-oldest", on_drop=lambda n, item, total: dropped.append(item))
    results = [box.put(i) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert box.drain() == [2, 3, 4] and dropped == [0, 1]
    assert (box.stats.accepted, box.stats.dropped, box.stats.high_water) == (5, 2, 3)


def test_drop_newest_keeps_the_first() -> None:
    box: Inbox[int] = Inbox("t", 2, "drop-newest")
    for i in range(4):
        box.put(i)
    assert box.drain() == [0, 1] and box.stats.dropped == 2


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        Inbox("t", 0)
    with pytest.raises(ValueError, match="overflow"):
        Inbox("t", 1, "grow")  # type: ignore[arg-type]


async def test_get_waits_for_a_put() -> None:
    box: Inbox[str] = Inbox("t", 1)
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    box.put("x")
    assert await asyncio.wait_for(getter, 1) == "x"


def test_rate_limited_warning_reports_counts_once_per_period() -> None:
    warn = RateLimitedWarning(period_s=3600)
    assert warn.should_log() == 1
    assert [warn.should_log() for _ in range(3)] == [0, 0, 0]
