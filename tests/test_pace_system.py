"""The pace on a running system (real broker, real services): told on control/pace/<source>,
retained, followed by ``offramp publish``, withdrawn when the controller stops."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from offramp.bus import Bus, Topics
from offramp.local.broker import LocalBroker
from offramp.local.client import collect, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire import Pace, Result

pytestmark = [pytest.mark.tier("broker"), pytest.mark.exclusive]  # times and rates

# The rate strategy with a low admitted rate: a camera at 4x it is refused 3 frames in 4
# unless it follows the pace, whatever this machine's speed.
RATE = {"OFFRAMP_CONTROL_STRATEGY": "rate", "OFFRAMP_CONTROL_RATE_MAX": "100",
        "OFFRAMP_ARBITER_REPUBLISH_S": "0.5"}


async def _publish(system: LocalSystem, *args: str, expect: int) -> tuple[str, list[Result]]:
    topics = Topics(system.prefix)
    settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix)
    async with Bus(settings, f"test-pace-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        results = await bus.subscribe(topics.results("cam-p"), qos=1, maxsize=10_000)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "offramp.cli", "publish", "--broker", system.url,
            "--prefix", system.prefix, "--source", "cam-p", "--rate", "400", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        got = await collect(results, expect, 20)
        await results.close()
    return err.decode(), got.results


async def _retained_pace(url: str, prefix: str) -> Pace | None:
    topics = Topics(prefix)
    settings = BusSettings(broker_url=url, topic_prefix=prefix)
    async with Bus(settings, f"test-pace-read-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        sub = await bus.subscribe(topics.pace("cam-p"), qos=1, maxsize=8)
        try:
            msg = await asyncio.wait_for(sub.get(), 2)
        except TimeoutError:
            return None
        finally:
            await sub.close()
        return Pace.from_json(msg.payload) if msg.payload else None


def _dropped(results: list[Result]) -> int:
    return sum(r.status == "dropped" for r in results)


def test_a_camera_that_follows_the_pace_is_not_refused_and_one_that_does_not_is(
        tiny_bundle: Bundle, prefix: str, broker: LocalBroker) -> None:
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=RATE, broker_url=broker.url) as system:
        _, ignored = asyncio.run(_publish(
            system, "--count", "300", "--no-follow-rate", expect=300))
        assert len(ignored) == 300 and _dropped(ignored) >= 150, _dropped(ignored)

        pace = asyncio.run(_retained_pace(broker.url, prefix))  # told while the flood went on, retained
        assert pace is not None and 80 <= pace.rate_hz <= 100, pace
        err, followed = asyncio.run(_publish(system, "--count", "300", expect=300))
        assert len(followed) == 300, len(followed)  # every frame answered, none left out
        assert _dropped(followed) <= 15, (_dropped(followed), err)
        assert "followed the pace" in err, err
    # a controller that stops withdraws what it told: no camera follows a rate nobody measures
    assert asyncio.run(_retained_pace(broker.url, prefix)) is None
