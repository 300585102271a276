"""The bus's own read path (offramp.bus.read_path): packets split anywhere, paho's share, a broker."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from offramp.bus.connection import Bus
from offramp.bus.read_path import FastInbound
from offramp.settings import BusSettings


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


def publish(topic: str, payload: bytes, qos: int = 0, mid: int = 0, retain: bool = False,
            props: bytes = b"\x00") -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (mid.to_bytes(2, "big") if qos else b"") + props
    return _packet(0x30 | (qos << 1) | int(retain), body + payload)


class FakeSocket:
    """Hands out a byte stream in the chunk sizes given, then 'nothing now'."""

    def __init__(self, stream: bytes, sizes: list[int]) -> None:
        self.chunks: deque[bytes] = deque()
        pos = 0
        for n in [*sizes, len(stream)]:
            if stream[pos:pos + n]:
                self.chunks.append(stream[pos:pos + n])
            pos += n

    def recv(self, bufsize: int) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.popleft()
        if len(chunk) > bufsize:
            self.chunks.appendleft(chunk[bufsize:])
            chunk = chunk[:bufsize]
        return chunk


def _client(sock: FakeSocket, got: list[tuple[str, bytes, bool]], acks: list[int]) -> Any:
    """A real, unconnected paho client reading from ``sock``; PUBACKs it would send are noted."""
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    paho._sock_recv = sock.recv
    paho._send_puback = lambda mid: acks.append(mid) or mqtt.MQTT_ERR_SUCCESS
    paho.on_message = lambda c, u, m: got.append((m.topic, m.payload, bool(m.retain)))
    return paho


def _stream() -> tuple[bytes, list[tuple[str, bytes, bool]]]:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("camera", "north")
    big = random.Random(1).randbytes(300_000)
    parts = [
        (publish("a/1", b"first"), ("a/1", b"first", False)),
        (publish("a/2", b"second", qos=1, mid=7), ("a/2", b"second", False)),
        (_packet(0xD0, b""), None),  # PINGRESP: paho's
        (publish("a/3", b"with properties", qos=1, mid=8, props=props.pack()),
         ("a/3", b"with properties", False)),  # a property list: paho's
        (publish("a/4", big, qos=1, mid=9), ("a/4", big, False)),
        (publish("a/5", b"", retain=True), ("a/5", b"", True)),
        (publish("a/\u00e9", b"utf-8 topic"), ("a/\u00e9", b"utf-8 topic", False)),
    ]
    return b"".join(p for p, _ in parts), [e for _, e in parts if e is not None]


@pytest.mark.parametrize("seed", range(6))
def test_packets_split_anywhere_arrive_whole_and_in_order(seed: int) -> None:
    stream, expected = _stream()
    rng = random.Random(seed)
    sizes = [1] * len(stream) if seed == 0 else [rng.choice((1, 2, 3, 7, 100, 4096, 70_000))
                                                 for _ in range(60)]
    got: list[tuple[str, bytes, bool]] = []
    acks: list[int] = []
    paho = _client(FakeSocket(stream, sizes), got, acks)
    reader = FastInbound(paho, lambda t, p, r: got.append((t, p, r)))
    reader.install()
    for _ in range(len(stream) + 10):
        rc = paho._packet_read()
        assert rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN)
        if rc == mqtt.MQTT_ERR_AGAIN and not paho._sock_recv.__self__.chunks:
            break
    assert got == expected
    assert acks == [7, 8, 9]  # each QoS 1 message acknowledged once, after its delivery
    assert reader.fast == 5 and reader.delegated == 2  # PINGRESP and the one with properties


def test_a_closed_or_broken_stream_reports_the_connection_lost() -> None:
    paho = _client(FakeSocket(b"", []), [], [])
    reader = FastInbound(paho, lambda t, p, r: None)
    assert reader.read() == mqtt.MQTT_ERR_AGAIN  # nothing to read now
    paho._sock_recv = lambda n: b""
    assert reader.read() == mqtt.MQTT_ERR_CONN_LOST  # recv returned b"": the peer closed
    bad = _client(FakeSocket(b"\x30\xff\xff\xff\xff\x01", []), [], [])
    assert FastInbound(bad, lambda t, p, r: None).read() == mqtt.MQTT_ERR_PROTOCOL


async def test_over_a_broker_fast_and_paho_paths_keep_one_order(bus_settings: BusSettings
                                                                  ) -> None:
    """Plain messages take the bus's path; one with a user property takes paho's; a 5 MB one
    spans many reads. The subscriber sees them all, once, in the order they were sent."""
    host, port = bus_settings.address().host, bus_settings.address().port
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "raw-sender", protocol=mqtt.MQTTv5)
    sender.connect(host, port)
    sender.loop_start()
    big = random.Random(2).randbytes(5_000_000)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    try:
        async with Bus(bus_settings, "rx-inbound") as rx:
            await rx.wait_connected(5)
            sub = await rx.subscribe("inbound/#", qos=1, maxsize=1000)
            await asyncio.sleep(0.2)
            sent = [(f"inbound/{i}", f"m{i}".encode()) for i in range(200)]
            sent.insert(50, ("inbound/props", b"with a property"))
            sent.insert(120, ("inbound/big", big))
            for topic, payload in sent:
                info = sender.publish(topic, payload, qos=1,
                                      properties=props if topic.endswith("props") else None)
                await asyncio.to_thread(info.wait_for_publish, 10)
            got = [await asyncio.wait_for(sub.get(), 10) for _ in sent]
            assert [(m.topic, m.payload) for m in got] == sent
            assert rx.inbound is not None and rx.inbound.delegated >= 1  # CONNACK, SUBACK, ...
            assert rx.inbound.fast >= len(sent) - 1
    finally:
        sender.loop_stop()
        sender.disconnect()


def test_it_refuses_a_client_that_does_not_speak_mqtt_v5() -> None:
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    with pytest.raises(ValueError, match="MQTT v5"):
        FastInbound(paho, lambda t, p, r: None).install()
