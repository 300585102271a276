"""The bus's read path: MQTT packets parsed from large reads, PUBLISH and PUBACK handled here.

paho-mqtt reads each packet with at least three ``recv`` calls (the type byte, each byte of the
length, the body). For every PUBLISH it copies the payload about five times, builds an MQTT v5
``Properties`` object (about 20 us each: it rebuilds its tables per instance), an
``MQTTMessage`` and aiomqtt's ``Message``, and matches per-topic callbacks that the bus never
registers; for every PUBACK it builds ``Properties`` and ``ReasonCode`` again. Measured on the
project's 2-core machine, a QoS 1 message cost about 400 us of CPU between its publisher and its
subscriber, which was most of the gap between the distributed pipeline and one ONNX session.

:class:`FastInbound` takes over paho's ``_packet_read`` on one client (aiomqtt >=2.5,<3 and
paho-mqtt >=2.1,<3 are pinned; both keep these internals). It reads whatever the socket has,
splits it into packets, and:

- hands a PUBLISH of QoS 0 or 1 without properties to the bus at once, and acknowledges a QoS 1
  one with paho's own ``_send_puback`` after that (the same order as paho);
- completes a PUBACK whose reason is success through paho's ``_do_on_publish``, which keeps
  paho's in-flight accounting, with one shared success reason instead of two new objects;
- gives every other packet (CONNACK, SUBACK, PINGRESP, QoS 2, a PUBLISH with properties, a
  PUBACK with a failure reason, DISCONNECT) to paho's ``_packet_handle``, as paho would.

A connection is one client, so the buffer never outlives the socket it was read from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

Deliver = Callable[[str, bytes, bool], None]  # topic, payload, retained

PUBLISH, PUBACK = 0x30, 0x40
READ_BYTES = 256 * 1024
# What may follow a PUBACK's packet id when the broker accepted the message (MQTT v5 3.4.2):
# nothing, reason 0, or reason 0 and an empty property list.
_SUCCESS = (b"", b"\x00", b"\x00\x00")
MQTTv5 = MQTTProtocolVersion.MQTTv5


def _varint(buf: bytearray | bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it) of the variable byte integer at ``pos``; None when it runs
    past ``end`` (more bytes are needed); ValueError when it is over 4 bytes long."""
    value, shift = 0, 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 28:
            raise ValueError("variable byte integer over 4 bytes")
    return None


class FastInbound:
    """Reads and dispatches the packets of one paho client; see the module docstring."""

    def __init__(self, paho: Any, deliver: Deliver) -> None:
        self._paho = paho
        self._deliver = deliver
        self._buf = bytearray()
        self._ok = ReasonCode(PacketTypes.PUBACK)
        self._no_props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
        self.fast = 0  # packets handled here
        self.delegated = 0  # packets handed to paho

    def install(self) -> None:
        if self._paho._protocol != MQTTv5:  # the parser reads v5's property length
            raise ValueError("FastInbound reads MQTT v5 connections only")
        self._paho._packet_read = self.read  # an instance attribute shadows paho's method

    def read(self) -> MQTTErrorCode:
        """paho's ``_packet_read`` contract: AGAIN when the socket has nothing now, an error
        code when the connection is gone or broken, SUCCESS after handling what arrived."""
        paho = self._paho
        try:
            data = paho._sock_recv(READ_BYTES)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError:  # ConnectionError included: the socket is gone
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while end - pos >= 2:
            try:
                length = _varint(buf, pos + 1, end)
            except ValueError:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            if length is None or length[1] + length[0] > end:
                break  # the rest of this packet has not arrived yet
            size, start = length
            header = buf[pos]
            pos = start + size
            rc = self._packet(header, buf, start, pos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        now = time.monotonic()  # paho's clock for keepalive
        with paho._msgtime_mutex:
            paho._last_bytes_received = now
            if pos:
                paho._last_msg_in = now
        if pos:
            del buf[:pos]
        return rc

    def _packet(self, header: int, buf: bytearray, start: int, end: int) -> MQTTErrorCode:
        """Handle the packet whose body is ``buf[start:end]``."""
        kind = header & 0xF0
        if kind == PUBLISH and (header & 0x06) != 0x04:  # QoS 0 or 1
            rc = self._publish(header, buf, start, end)
            if rc is not None:
                return rc
        elif kind == PUBACK and end - start >= 2 and bytes(buf[start + 2:end]) in _SUCCESS:
            mid = int.from_bytes(buf[start:start + 2], "big")
            self.fast += 1
            paho = self._paho
            with paho._out_message_mutex:
                if mid in paho._out_messages:
                    done: MQTTErrorCode = paho._do_on_publish(mid, self._ok, self._no_props)
                    return done
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._delegate(header, bytes(buf[start:end]))

    def _publish(self, header: int, buf: bytearray, start: int, end: int
                 ) -> MQTTErrorCode | None:
        """Deliver a QoS 0/1 PUBLISH without properties; None: let paho handle it."""
        qos = (header >> 1) & 0x03
        if end - start < 2:
            return None
        tlen = int.from_bytes(buf[start:start + 2], "big")
        pos = start + 2 + tlen
        mid = 0
        if qos:
            mid = int.from_bytes(buf[pos:pos + 2], "big")
            pos += 2
        if pos >= end or buf[pos] != 0:  # v5 properties (or a short packet): paho's job
            return None
        try:
            topic = buf[start + 2:start + 2 + tlen].decode("utf-8")
        except UnicodeDecodeError:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos + 1:end])  # the one copy of the payload
        self.fast += 1
        self._deliver(topic, payload, bool(header & 0x01))
        if qos:
            rc: MQTTErrorCode = self._paho._send_puback(mid)
            return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _delegate(self, header: int, body: bytes) -> MQTTErrorCode:
        paho = self._paho
        self.delegated += 1
        paho._in_packet = _in_packet(header, body)
        try:
            rc: MQTTErrorCode = paho._packet_handle()
        except Exception:  # paho's MalformedPacket and its kin: the connection is broken
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        paho._in_packet = _in_packet(0, b"")  # as paho leaves it between packets
        return rc


def _in_packet(command: int, body: bytes) -> dict[str, Any]:
    """paho's record of a packet it has read whole (``command`` 0: none)."""
    return {"command": command, "have_remaining": int(command != 0), "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body), "packet": bytearray(body),
            "to_process": 0, "pos": 0}
