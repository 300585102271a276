"""The bus's read paths: the fast one (mqtt5 on large reads) with packets split anywhere and
paho's share, both paths over a broker, and the fence around paho's and aiomqtt's internals."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections import deque
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from offramp.bus import Bus, paho_internals
from offramp.bus.paho_internals import PahoHandle
from offramp.bus.read_path import FastReadPath, Incoming
from offramp.errors import BusError
from offramp.settings import BusSettings

pytestmark = pytest.mark.tier("inproc")

ROOT = Path(__file__).resolve().parent.parent


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
    """A real, unconnected paho client reading from ``sock``; PUBACKs it would send are noted.
    (The test reaches into paho to stand in for the socket: the socket is not what it tests.)"""
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    paho._sock_recv = sock.recv
    paho._send_puback = lambda mid: acks.append(mid) or mqtt.MQTT_ERR_SUCCESS
    paho.on_message = lambda c, u, m: got.append((m.topic, m.payload, bool(m.retain)))
    return paho


def _reader(paho: Any, got: list[tuple[str, bytes, bool]] | None = None,
            seen: list[Incoming] | None = None) -> FastReadPath:
    def deliver(m: Incoming) -> None:
        if got is not None:
            got.append((m.topic, m.payload, m.retain))
        if seen is not None:
            seen.append(m)
    return FastReadPath(PahoHandle(paho), deliver)


def _stream() -> tuple[bytes, list[tuple[str, bytes, bool]]]:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("camera", "north")
    props.ResponseTopic = "replies/cam"
    props.CorrelationData = b"\x01frame-7"
    big = random.Random(1).randbytes(300_000)
    parts = [
        (publish("a/1", b"first"), ("a/1", b"first", False)),
        (publish("a/2", b"second", qos=1, mid=7), ("a/2", b"second", False)),
        (_packet(0xD0, b""), None),  # PINGRESP: paho's
        (publish("a/3", b"with properties", qos=1, mid=8, props=props.pack()),
         ("a/3", b"with properties", False)),  # a property list: mqtt5 reads it too
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
    seen: list[Incoming] = []
    acks: list[int] = []
    paho = _client(FakeSocket(stream, sizes), got, acks)
    reader = _reader(paho, got, seen)
    reader.install()
    for _ in range(len(stream) + 10):
        rc = paho._packet_read()
        assert rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN)
        if rc == mqtt.MQTT_ERR_AGAIN and not paho._sock_recv.__self__.chunks:
            break
    assert got == expected
    assert acks == [7, 8, 9]  # each QoS 1 message acknowledged once, after its delivery
    assert reader.fast == 6 and reader.delegated == 1  # PINGRESP is paho's
    with_props = next(m for m in seen if m.topic == "a/3")
    assert (with_props.response_topic, with_props.correlation_data) == ("replies/cam",
                                                                          b"\x01frame-7")


def test_a_closed_or_broken_stream_reports_the_connection_lost() -> None:
    paho = _client(FakeSocket(b"", []), [], [])
    reader = _reader(paho)
    assert reader.read() == mqtt.MQTT_ERR_AGAIN  # nothing to read now
    paho._sock_recv = lambda n: b""
    assert reader.read() == mqtt.MQTT_ERR_CONN_LOST  # recv returned b"": the peer closed
    bad = _client(FakeSocket(b"\x30\xff\xff\xff\xff\x01", []), [], [])
    assert _reader(bad).read() == mqtt.MQTT_ERR_PROTOCOL


@pytest.mark.parametrize("read_path", ["fast", "library"])
async def test_over_a_broker_fast_and_paho_paths_keep_one_order(bus_settings: BusSettings,
                                                                read_path: str) -> None:
    """Plain messages, one with properties (its response topic and correlation data come
    through), and a 5 MB one that spans many reads: the subscriber sees them all, once, in the
    order they were sent, on either read path."""
    bus_settings = dataclasses.replace(bus_settings, bus_read_path=read_path)  # type: ignore[arg-type]
    host, port = bus_settings.address().host, bus_settings.address().port
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "raw-sender", protocol=mqtt.MQTTv5)
    sender.connect(host, port)
    sender.loop_start()
    big = random.Random(2).randbytes(5_000_000)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    props.ResponseTopic = "replies/raw"
    props.CorrelationData = b"corr-1"
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
            asked = got[50]
            assert (asked.response_topic, asked.correlation_data) == ("replies/raw", b"corr-1")
            if read_path == "fast":
                assert rx.inbound is not None and rx.inbound.delegated >= 1  # CONNACK, SUBACK
                assert rx.inbound.fast >= len(sent)
            else:
                assert rx.inbound is None
    finally:
        sender.loop_stop()
        sender.disconnect()


def test_it_refuses_a_client_that_does_not_speak_mqtt_v5() -> None:
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    with pytest.raises(ValueError, match="MQTT v5"):
        _reader(paho).install()


# mqtt5 0.8 reports the decode error as unraisable, then panics (a PanicException)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_packet_mqtt5_refuses_goes_to_paho_whole() -> None:
    """mqtt5 validates strictly; what it refuses is framed by its fixed header and given to
    paho, which owns the connection and judges it (here: a PUBLISH whose topic is not UTF-8)."""
    bad = bytearray(publish("xx/3", b"three"))
    bad[4:6] = b"\xff\xfe"
    stream = publish("ok/1", b"one") + bytes(bad) + publish("ok/2", b"two")
    got: list[tuple[str, bytes, bool]] = []
    paho = _client(FakeSocket(stream, []), got, [])
    handled: list[int] = []
    paho._packet_handle = lambda: handled.append(paho._in_packet["command"]) or mqtt.MQTT_ERR_SUCCESS
    reader = _reader(paho, got)
    assert reader.read() == mqtt.MQTT_ERR_SUCCESS
    assert [t for t, _, _ in got] == ["ok/1", "ok/2"]
    assert handled == [0x30] and reader.delegated == 1


async def test_missing_library_internals_stop_the_bus_at_start_naming_the_versions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A paho release that renamed a name the fast read path uses (here: one the fence asks for
    and paho does not have): one clear error before any connection, naming what is missing
    and the versions installed; the library read path, which does not use it, still starts."""
    monkeypatch.setattr(paho_internals, "READ_PATH_NAMES",
                        (*paho_internals.READ_PATH_NAMES, "_send_puback_v3"))
    with pytest.raises(BusError, match=r"paho Client\._send_puback_v3.*paho-mqtt \d.*aiomqtt \d.*"
                                       r"OFFRAMP_BUS_READ_PATH=library"):
        paho_internals.check(read_path=True)
    paho_internals.check(read_path=False)


async def test_a_bus_whose_internals_are_gone_does_not_connect(
        bus_settings: BusSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paho_internals, "READ_PATH_NAMES",
                        (*paho_internals.READ_PATH_NAMES, "_packet_handle_v3"))
    with pytest.raises(BusError, match="_packet_handle_v3"):
        async with Bus(bus_settings, "doomed"):
            pass
    library = dataclasses.replace(bus_settings, bus_read_path="library")
    async with Bus(library, "fine") as bus:
        await bus.wait_connected(5)


PRIVATE = re.compile(
    r"\b(?:aiomqtt|paho)\S*\s+import\s+[^\n]*\b_[a-z]"  # from paho.x import _private
    r"|\._(?:" + "|".join(n.lstrip("_") for n in (*paho_internals.AIOMQTT_NAMES,
                                                   *paho_internals.READ_PATH_NAMES)) + r")\b")


def test_no_private_name_of_paho_or_aiomqtt_outside_the_fenced_module() -> None:
    fence = ROOT / "shared/offramp/bus/paho_internals.py"
    offenders = []
    for source in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        if source == fence:
            continue
        for n, line in enumerate(source.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{source.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
    assert PRIVATE.search(fence.read_text())  # the pattern does find what it looks for
