"""The pace told to each camera: the policy (pure, against a simulated queue), its wire form,
and the follower a camera uses."""

from __future__ import annotations

import collections
import json
import time

import pytest

from offramp.bus import Message, Topics
from offramp.client.pace import PaceFollower
from offramp.errors import TopicError, WireError
from offramp.policy.pace import Load, PaceConfig, Pacer
from offramp.wire import Pace


def _simulate(offered: float, *, capacity: float = 1700.0, bound: int = 256, seconds: float = 60,
              follow: bool = True) -> dict[str, float]:
    """A source offering ``offered`` frames/s to a server of ``capacity`` frames/s whose frames
    take 30 ms at least; frames beyond ``bound`` in flight are refused. The camera follows
    the pace one interval late (it travels over the broker). Figures over the last 40 s."""
    pacer = Pacer(PaceConfig(bound=bound))
    step, interval, latency = 0.005, 0.5, 0.03
    told: float | None = None
    late: collections.deque[float | None] = collections.deque()
    queue = in_flight = admitted = 0.0
    serving: collections.deque[tuple[float, float]] = collections.deque()
    t, next_tick = 0.0, interval
    totals = {"sent": 0.0, "refused": 0.0, "served": 0.0}
    while t < seconds:
        counting = t >= seconds - 40
        rate = min(offered, told) if follow and told else offered
        arriving = rate * step
        taken = min(arriving, bound - in_flight)
        if counting:
            totals["sent"] += arriving
            totals["refused"] += arriving - taken
        admitted += taken
        queue += taken
        in_flight += taken
        done = min(queue, capacity * step)
        queue -= done
        serving.append((t + latency, done))
        while serving and serving[0][0] <= t:
            _, finished = serving.popleft()
            in_flight -= finished
            totals["served"] += finished if counting else 0.0
        t += step
        if t >= next_tick:
            next_tick += interval
            late.append(pacer.update("cam", Load(int(admitted), int(admitted), int(in_flight)), t))
            if len(late) > 1 and (said := late.popleft()) is not None:
                told = said
    return {k: v / 40 for k, v in totals.items()}


@pytest.mark.parametrize("offered", [1.06 * 1700, 2 * 1700, 5 * 1700])
def test_a_camera_that_follows_the_pace_is_served_at_capacity_and_refused_nothing(
        offered: float) -> None:
    followed = _simulate(offered)
    assert followed["refused"] == 0
    assert followed["served"] >= 0.97 * 1700
    assert followed["sent"] <= 1.03 * 1700  # the surplus stayed at the camera
    ignored = _simulate(offered, follow=False)
    assert ignored["refused"] >= 0.9 * (offered - 1700)


def test_a_camera_under_capacity_is_told_more_than_it_sends() -> None:
    assert _simulate(1000)["refused"] == 0
    pacer = Pacer(PaceConfig(bound=256))
    assert pacer.update("cam", Load(0, 0, 0), 0.0) is None  # nothing known yet
    told = pacer.update("cam", Load(500, 500, 20), 0.5)
    assert told is not None and told > 1000  # never the camera's own limit


def test_a_source_over_its_share_is_told_less_than_it_is_served() -> None:
    pacer = Pacer(PaceConfig(bound=256))
    pacer.update("cam", Load(0, 0, 0), 0.0)
    # 1,000 arrived and were admitted in 0.5 s; 256 in flight: 744 served, 1,488/s
    told = pacer.update("cam", Load(1000, 1000, 256), 0.5)
    assert told is not None and told < 1488 - 100


def test_a_silent_source_keeps_its_pace_and_repeats_are_not_told() -> None:
    pacer = Pacer(PaceConfig(bound=256))
    pacer.update("cam", Load(0, 0, 0), 0.0)
    first = pacer.update("cam", Load(100, 100, 10), 0.5)
    assert first is not None
    assert pacer.update("cam", Load(100, 100, 10), 1.0) is None  # silent
    assert pacer.advised("cam") == first
    assert pacer.update("cam", Load(200, 200, 10), 1.5) is None  # the same again
    assert pacer.update("cam", Load(300, 300, 10), 7.0) is not None  # refreshed
    assert pacer.forget("cam") and not pacer.forget("cam") and len(pacer) == 0


def test_an_enforced_admitted_rate_is_told_from_the_first_interval_with_a_margin() -> None:
    pacer = Pacer(PaceConfig(bound=256))
    assert pacer.update("cam", Load(0, 0, 0), 0.0, ceiling_hz=100) == pytest.approx(95)
    told = pacer.update("cam", Load(500, 100, 0), 0.5, ceiling_hz=100)
    assert told is None or told <= 95


def test_a_pace_never_falls_to_zero() -> None:
    pacer = Pacer(PaceConfig(bound=4))
    pacer.update("cam", Load(0, 0, 0), 0.0)
    assert pacer.update("cam", Load(10, 4, 4), 10.0) == 1.0  # nothing served: the floor


def test_the_pace_on_the_wire_is_json_any_client_reads_and_garbage_is_one_error() -> None:
    pace = Pace(source="cam-1", rate_hz=812.5, by="admission-1", ts=1.0e9)
    obj = json.loads(pace.to_json())
    assert obj == {"source": "cam-1", "rate_hz": 812.5, "by": "admission-1", "ts": 1.0e9,
                   "valid_s": 15.0, "kind": "pace", "v": 1}
    assert Pace.from_json(pace.to_json()) == pace
    assert pace.holds(1.0e9 + 14) and not pace.holds(1.0e9 + 16)
    for bad, says in ((b"\xff\x00", "not JSON"), (b"[1]", "kind"),
                      (json.dumps({**obj, "rate_hz": 0}).encode(), "rate_hz"),
                      (json.dumps({**obj, "rate_hz": "fast"}).encode(), "rate_hz"),
                      (json.dumps({**obj, "ts": None}).encode(), "pace.ts"),
                      (json.dumps({**obj, "v": 9}).encode(), "version")):
        with pytest.raises(WireError, match=says):
            Pace.from_json(bad)
    topics = Topics("t")
    assert topics.parse(topics.pace("cam-1")).kind == "pace"
    with pytest.raises(TopicError):
        topics.pace("cam/1")


def test_a_follower_skips_frames_above_the_pace_and_lets_all_through_without_one() -> None:
    follower = PaceFollower(burst_s=0.1)
    assert all(follower.take(now=0.0) for _ in range(100))  # none told: every frame goes
    topic = Topics("t").pace("cam")
    pace = Pace(source="cam", rate_hz=50, by="a", ts=time.time())
    follower.read(Message(topic, pace.to_json()))
    assert follower.rate_hz == 50
    start = time.monotonic()
    sent = sum(follower.take(now=start + i / 200) for i in range(400))  # 2 s at 200 frames/s
    assert 100 <= sent <= 106 and follower.skipped == 400 - sent  # 50/s, and the burst
    follower.read(Message(topic, b"not json"))
    assert follower.undecodable == 1 and follower.rate_hz == 50  # garbage changes nothing
    follower.read(Message(topic, b""))  # withdrawn
    assert follower.rate_hz is None and follower.take()
    stale = Pace(source="cam", rate_hz=5, by="a", ts=1.0)  # from a controller long gone
    follower.read(Message(topic, stale.to_json()))
    assert follower.rate_hz is None and follower.take()
