"""Which admission-controller of a group holds the ingest session (pure: heartbeats in)."""

from __future__ import annotations

from admission_controller.leadership import Leadership
from offramp.wire import Heartbeat


def beat(node: str, active_since: float, *, online: bool = True) -> Heartbeat:
    return Heartbeat(role="admission", node=node, online=online, group="admission",
                     active_since=active_since)


def test_a_primary_takes_the_session_when_nobody_holds_it_and_a_standby_waits() -> None:
    primary = Leadership("a1", wait_s=0.5, stale_s=0.75, started=0.0)
    standby = Leadership("a2", wait_s=1.0, stale_s=0.75, started=0.0)
    assert primary.step(0.4, 1000.0) is None
    assert primary.step(0.5, 1000.5) == "take" and primary.active
    standby.observe(beat("a1", primary.active_since), 0.6)
    for now in (0.6, 1.0, 1.2, 1.3):
        standby.observe(beat("a1", primary.active_since), now)
        assert standby.step(now, 1000.0 + now) is None
    assert standby.standby_alive(1.3) and not standby.active


def test_the_standby_takes_over_after_the_wait_once_the_active_one_is_gone() -> None:
    standby = Leadership("a2", wait_s=1.0, stale_s=0.75, started=0.0)
    standby.observe(beat("a1", 999.0), 5.0)
    assert standby.step(5.0, 1005.0) is None
    standby.observe(beat("a1", 0.0, online=False), 5.1)  # its will: it is gone
    assert standby.step(5.5, 1005.5) is None  # the wait runs from when it was last active
    assert standby.step(6.0, 1006.0) == "take"
    silent = Leadership("a3", wait_s=1.0, stale_s=0.75, started=0.0)
    silent.observe(beat("a1", 999.0), 5.0)  # then nothing more: stale after 0.75 s
    assert silent.step(5.5, 1005.5) is None and silent.step(5.9, 1005.9) is None
    assert silent.step(6.0, 1006.0) == "take"


def test_a_restarted_primary_finds_its_standby_active_and_stands_by() -> None:
    primary = Leadership("a1", wait_s=0.5, stale_s=0.75, started=10.0)
    for now in (10.1, 10.4, 10.7):
        primary.observe(beat("a2", 1005.0), now)
        assert primary.step(now, 1000.0 + now) is None
    assert not primary.active


def test_of_two_active_ones_the_one_that_took_over_later_keeps_the_session() -> None:
    """The broker gives the session to whoever connected last: the other one gives it up;
    two that claimed at the same moment keep it with the lower node name."""
    a = Leadership("a1", wait_s=0.5, stale_s=0.75, started=0.0)
    assert a.step(0.5, 1000.0) == "take"
    a.observe(beat("a2", 1003.0), 3.1)
    assert a.step(3.1, 1003.1) == "give" and not a.active
    b = Leadership("a2", wait_s=0.5, stale_s=0.75, started=0.0)
    assert b.step(0.5, 1000.0) == "take"
    b.observe(beat("a1", 1000.0), 0.6)
    assert b.step(0.6, 1000.1) == "give"
    c = Leadership("a1", wait_s=0.5, stale_s=0.75, started=0.0)
    assert c.step(0.5, 1000.0) == "take"
    c.observe(beat("a2", 1000.0), 0.6)
    assert c.step(0.6, 1000.1) is None and c.active
