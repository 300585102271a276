"""The bus's fast read path: MQTT packets decoded by the ``mqtt5`` codec from large reads.

paho-mqtt reads each packet with at least three ``recv`` calls (the type byte, each byte of the
length, the body), copies a PUBLISH payload about five times and builds an MQTT v5
``Properties`` object (about 20 us) for every PUBLISH and PUBACK. On the project's 2-core
machine a QoS 1 message cost about 400 us of CPU between its publisher and its subscriber.

:class:`FastReadPath` takes paho's packet read over on one connection (through
:class:`~offramp.bus.paho_internals.PahoHandle`, the only place that touches paho's internals).
It reads whatever the socket has, lets ``mqtt5`` (a sans-I/O codec in Rust, by aiomqtt's
maintainer) decode each whole packet, and:

- hands a PUBLISH of QoS 0 or 1 to the bus at once, with its response topic and correlation
  data, then acknowledges a QoS 1 one (the same order as paho);
- completes a successful PUBACK through paho's in-flight accounting;
- gives every other packet (CONNACK, SUBACK, PINGRESP, QoS 2, a PUBACK with a failure reason,
  DISCONNECT) to paho's own handler, in stream order.

``OFFRAMP_BUS_READ_PATH=library`` leaves all of it to paho and aiomqtt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mqtt5
from paho.mqtt.enums import MQTTErrorCode

from offramp.bus.paho_internals import PahoHandle

READ_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Incoming:
    """What a PUBLISH carries that the bus passes on."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    packet_id: int = 0  # a QoS 1 message this side acknowledges itself (manual ack); else 0


Deliver = Callable[[Incoming], None]


def _frame(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """(start of the variable header, end) of the packet at ``pos`` from its fixed header; None
    while it has not all arrived; ValueError when its length field is over 4 bytes."""
    length, shift, i = 0, 0, pos + 1
    while i < len(buf):
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return (i, i + length) if i + length <= len(buf) else None
        shift += 7
        if shift >= 28:
            raise ValueError("variable byte integer over 4 bytes")
    return None


class FastReadPath:
    """Reads and dispatches the packets of one paho client; see the module docstring."""

    def __init__(self, paho: PahoHandle, deliver: Deliver, *, manual_ack: bool = False) -> None:
        self._paho = paho
        self._deliver = deliver
        self._manual_ack = manual_ack  # QoS 1: the receiver acknowledges when it is done
        self._buf = bytearray()
        self.fast = 0  # packets handled here
        self.delegated = 0  # packets handed to paho

    def install(self) -> None:
        if not self._paho.speaks_v5():
            raise ValueError("the fast read path reads MQTT v5 connections only")
        self._paho.take_over_reads(self.read)

    def read(self) -> MQTTErrorCode:
        """paho's ``_packet_read`` contract: AGAIN when the socket has nothing now, an error
        code when the connection is gone or broken, SUCCESS after handling what arrived."""
        try:
            data = self._paho.recv(READ_BYTES)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError:  # ConnectionError included: the socket is gone
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        buf = self._buf
        buf += data
        pos = 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        with memoryview(buf) as view:
            while pos < len(buf):
                try:
                    packet, size = mqtt5.read(view[pos:])
                except IndexError:  # the rest of this packet has not arrived yet
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # mqtt5 refuses it (ValueError), or its
                    # Rust side panics (mqtt5 0.8 does on a topic that is not UTF-8, raising a
                    # BaseException): paho, the connection's owner, judges the packet
                    try:
                        frame = _frame(buf, pos)
                    except ValueError:
                        rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                        break
                    if frame is None:
                        break
                    rc = self._delegate(buf[pos], bytes(view[frame[0]:frame[1]]))
                    pos = frame[1]
                else:
                    rc = self._packet(packet, buf, pos, pos + size)
                    pos += size
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._paho.mark_received()
        if pos:
            del buf[:pos]
        return rc

    def _packet(self, packet: object, buf: bytearray, start: int, end: int) -> MQTTErrorCode:
        if isinstance(packet, mqtt5.PublishPacket) and packet.qos != mqtt5.QoS.EXACTLY_ONCE \
                and packet.topic:  # a topic alias (never asked for) is paho's business
            self.fast += 1
            qos1 = packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None
            manual = self._manual_ack and qos1
            self._deliver(Incoming(packet.topic, packet.payload, packet.retain,
                                   packet.response_topic, packet.correlation_data,
                                   packet.packet_id or 0 if manual else 0))
            if qos1 and not manual:
                return self._paho.send_puback(packet.packet_id or 0)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if isinstance(packet, mqtt5.PubAckPacket) \
                and packet.reason_code == mqtt5.PubAckReasonCode.SUCCESS:
            self.fast += 1
            return self._paho.acknowledged(packet.packet_id)
        frame = _frame(buf, start)
        assert frame is not None and frame[1] == end  # mqtt5 read this very packet
        return self._delegate(buf[start], bytes(buf[frame[0]:end]))

    def _delegate(self, command: int, body: bytes) -> MQTTErrorCode:
        self.delegated += 1
        return self._paho.handle_packet(command, body)
