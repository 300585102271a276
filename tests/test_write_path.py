"""The bus's fast write path: paho's queued packets joined into few sends, a send the socket
takes only part of finished by the next, QoS 0 publishes reported as paho reports them, and
over a broker every message arrives once, in order, with far fewer sends than packets."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections import deque
from typing import Any

import pytest
from paho.mqtt.enums import MQTTErrorCode

from offramp.bus import Bus
from offramp.bus.write_path import DISCONNECT, PUBLISH, FastWritePath
from offramp.settings import BusSettings

pytestmark = pytest.mark.tier("inproc")

PUBACK = 0x40


def _record(command: int, body: bytes, qos: int = 0, mid: int = 0) -> dict[str, Any]:
    return {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(body),
            "packet": body, "info": None}


class _Paho:
    """Stands in for PahoHandle: a queue, and a socket that takes ``room`` bytes per send."""

    def __init__(self, packets: list[dict[str, Any]], room: list[int]) -> None:
        self.queue = deque(packets)
        self.room = room  # bytes each send takes (0: the socket is full)
        self.wire = bytearray()
        self.reported: list[int] = []  # QoS 0 publishes reported published, by mid
        self.by_paho = 0
        self.sent_marks = 0

    def out_packets(self) -> deque[dict[str, Any]]:
        return self.queue

    def sock_send(self, data: bytes) -> int:
        take = self.room.pop(0) if self.room else len(data)
        if take == 0:
            raise BlockingIOError
        self.wire += data[:take]
        return min(take, len(data))

    def published(self, packet: dict[str, Any]) -> None:
        self.reported.append(packet["mid"])

    def write_one_by_one(self) -> MQTTErrorCode:
        self.by_paho += 1
        self.queue.popleft()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def mark_sent(self) -> None:
        self.sent_marks += 1


def _writer(paho: _Paho) -> FastWritePath:
    return FastWritePath(paho)  # type: ignore[arg-type]


def test_queued_packets_go_in_one_send_and_qos0_publishes_are_reported() -> None:
    bodies = [bytes([i]) * (i + 1) for i in range(20)]
    packets = [_record(PUBACK, b) if i % 2 else _record(PUBLISH, b, qos=0, mid=i)
               for i, b in enumerate(bodies)]
    paho = _Paho(packets, room=[])
    w = _writer(paho)
    assert w.write() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert bytes(paho.wire) == b"".join(bodies) and w.sends == 1 and w.packets == 20
    assert paho.reported == list(range(0, 20, 2)) and not paho.queue and paho.sent_marks == 1


def test_a_partial_send_is_finished_by_the_next_and_a_full_socket_says_again() -> None:
    rng = random.Random(4)
    bodies = [rng.randbytes(rng.randint(1, 50)) for _ in range(30)]
    paho = _Paho([_record(PUBLISH, b, mid=i) for i, b in enumerate(bodies)],
                 room=[7, 100, 0])
    w = _writer(paho)
    assert w.write() == MQTTErrorCode.MQTT_ERR_AGAIN  # 107 bytes went, then the socket was full
    assert bytes(paho.wire) == b"".join(bodies)[:107]
    done = sum(1 for end in itertools.accumulate(len(b) for b in bodies) if end <= 107)
    assert paho.reported == list(range(done)) and len(paho.queue) == len(bodies) - done
    assert w.write() == MQTTErrorCode.MQTT_ERR_SUCCESS  # the socket takes the rest
    assert bytes(paho.wire) == b"".join(bodies) and paho.reported == list(range(30))


def test_a_disconnect_is_left_to_paho_and_never_joined() -> None:
    packets = [_record(PUBLISH, b"a", mid=1), _record(DISCONNECT, b"\xe0\x00"),
               _record(PUBLISH, b"b", mid=2)]
    paho = _Paho(packets, room=[])
    w = _writer(paho)
    w.write()
    assert bytes(paho.wire) == b"a" and paho.by_paho == 1 and paho.reported == [1]


async def test_over_a_broker_messages_arrive_once_in_order_from_few_sends(
        bus_settings: BusSettings) -> None:
    async with Bus(bus_settings, "tx-batched") as tx, Bus(bus_settings, "rx-batched") as rx:
        await tx.wait_connected(5)
        await rx.wait_connected(5)
        sub = await rx.subscribe("batched/#", qos=1, maxsize=10_000)
        await asyncio.sleep(0.2)
        sent = [(f"batched/{i % 7}", f"m{i}".encode() * (1 + i % 50)) for i in range(3000)]
        await asyncio.gather(*(tx.publish(t, p, qos=0) for t, p in sent))
        got = [await asyncio.wait_for(sub.get(), 10) for _ in sent]
        assert [(m.topic, m.payload) for m in got] == sent
        assert tx.outbound is not None and tx.outbound.packets >= len(sent)
        assert tx.outbound.sends < len(sent) / 10, (tx.outbound.sends, tx.outbound.packets)


async def test_a_write_waits_for_no_writer_registration_unless_the_socket_is_full(
        bus_settings: BusSettings) -> None:
    """QoS 1 publishes one after another (each waits for its PUBACK): each is written on
    the next loop turn, and the socket is never registered as a writer. A flood larger than
    the socket buffer fills it: the writer is registered then, and every message arrives, in
    order."""
    async with Bus(bus_settings, "tx-soon") as tx, Bus(bus_settings, "rx-soon") as rx:
        await tx.wait_connected(5)
        await rx.wait_connected(5)
        sub = await rx.subscribe("soon/#", qos=1, maxsize=10_000)
        await asyncio.sleep(0.2)
        soon = tx.write_soon
        assert soon is not None
        flushes, waits = soon.flushes, soon.waits
        for i in range(200):
            await tx.publish("soon/one", f"m{i}".encode(), qos=1)
        assert soon.flushes - flushes >= 200 and soon.waits == waits
        got = [await asyncio.wait_for(sub.get(), 10) for _ in range(200)]
        assert [m.payload for m in got] == [f"m{i}".encode() for i in range(200)]
        big = [bytes([i]) * (1 << 20) for i in range(64)]  # 64 MB at once
        await asyncio.gather(*(tx.publish("soon/big", b, qos=1) for b in big))
        got = [await asyncio.wait_for(sub.get(), 30) for _ in big]
        assert [m.payload for m in got] == big
        assert soon.waits > waits


async def test_the_library_path_leaves_writes_to_paho(bus_settings: BusSettings) -> None:
    library = dataclasses.replace(bus_settings, bus_read_path="library")
    async with Bus(library, "tx-library") as tx:
        await tx.wait_connected(5)
        await tx.publish("batched/x", b"y", qos=1)
        assert tx.outbound is None and tx.write_soon is None
