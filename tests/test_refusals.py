"""Refused frames are answered together (admission_controller.refusals): one message per
source and interval, one per response topic, every frame acknowledged only once its refusal is
at the broker. With a fake publish: this is about grouping and acknowledging, not the bus."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
import structlog

from admission_controller import refusals as refusals_mod
from admission_controller.refusals import Refusals
from offramp.bus import Message, Topics
from offramp.errors import BusError
from offramp.wire import read_results

pytestmark = pytest.mark.tier("inproc")


def _msg(i: int, reply: str | None = None) -> Message:
    return Message(topic="p/ingest/cam", payload=b"", response_topic=reply,
                   correlation_data=f"f{i}".encode())


class _Bus:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.acked: list[Message] = []
        self.fail = fail or set()

    async def publish(self, topic: str, payload: bytes) -> None:
        if topic in self.fail:
            raise BusError("not connected")
        self.sent.append((topic, payload))


def _refusals(bus: _Bus, counted: Counter[str], **kw: Any) -> Refusals:
    return Refusals(topics=Topics("p"), publish=bus.publish, acknowledge=bus.acked.append,
                    count=lambda source, n: counted.update({source: n}),
                    log=structlog.get_logger("test"), **{"interval_s": 0.05,
                                                         "max_pending": 1000, **kw})


async def test_one_refusal_per_source_and_response_topic_then_the_frames_are_acknowledged(
        ) -> None:
    bus, counted = _Bus(), Counter[str]()
    r = _refusals(bus, counted)
    msgs = [_msg(i, reply="p/replies/a" if i % 2 else None) for i in range(6)]
    for i, m in enumerate(msgs[:5]):
        r.add("cam-1", f"f{i}", "over the admitted rate" if i < 3 else "ingest queue full", m)
    r.add("cam-2", "g0", "ingest queue full", msgs[5])
    assert len(r) == 6 and bus.sent == [] and bus.acked == []
    await r.flush()
    topics = [t for t, _ in bus.sent]
    assert topics == ["p/results/cam-1", "p/replies/a", "p/results/cam-2", "p/replies/a"]
    first = read_results(bus.sent[0][1])
    assert [(x.frame_id, x.error) for x in first] == [
        ("f0", "over the admitted rate"), ("f1", "over the admitted rate"),
        ("f2", "over the admitted rate"), ("f3", "ingest queue full"),
        ("f4", "ingest queue full")]
    assert [x.frame_id for x in read_results(bus.sent[1][1])] == ["f1", "f3"]  # its own only
    assert json.loads(bus.sent[0][1])["kind"] == "refused"
    assert bus.acked == msgs and counted == {"cam-1": 5, "cam-2": 1} and len(r) == 0
    await r.flush()
    assert len(bus.sent) == 4  # nothing pending, nothing sent


async def test_a_refusal_that_cannot_be_published_leaves_its_frames_unacknowledged() -> None:
    bus, counted = _Bus(fail={"p/replies/b"}), Counter[str]()
    r = _refusals(bus, counted)
    r.add("cam-1", "f0", "over the admitted rate", _msg(0, reply="p/replies/b"))
    r.add("cam-2", "g0", "over the admitted rate", _msg(1))
    await r.flush()
    assert [m.correlation_data for m in bus.acked] == [b"f1"]  # cam-2's only
    assert counted == {"cam-2": 1} and r.failed == 1  # the broker hands cam-1's out again


async def test_long_refusals_are_split_and_a_full_table_goes_out_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusals_mod, "MAX_IDS", 4)
    bus, counted = _Bus(), Counter[str]()
    r = _refusals(bus, counted, interval_s=60.0, max_pending=10)
    runner = asyncio.create_task(r.run())
    for i in range(9):
        r.add("cam-1", f"f{i}", "a" if i < 6 else "b", _msg(i))
    await asyncio.sleep(0.05)
    assert bus.sent == []  # below the bound, the interval is a minute
    r.add("cam-1", "f9", "b", _msg(9))
    async with asyncio.timeout(5):
        while len(bus.acked) < 10:  # noqa: ASYNC110 - the flush task acknowledges
            await asyncio.sleep(0.01)
    runner.cancel()
    parts = [read_results(p) for _, p in bus.sent]
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [x.frame_id for p in parts for x in p] == [f"f{i}" for i in range(10)]


async def test_forgotten_refusals_are_neither_sent_nor_acknowledged() -> None:
    bus, counted = _Bus(), Counter[str]()
    r = _refusals(bus, counted)
    r.add("cam-1", "f0", "over the admitted rate", _msg(0))
    r.forget()
    await r.flush()
    assert bus.sent == [] and bus.acked == [] and len(r) == 0
