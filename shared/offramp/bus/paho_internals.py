"""The one module that touches private names of paho-mqtt and aiomqtt.

The bus keeps its connection, session, will and publishes with aiomqtt and paho-mqtt, but needs
a few things their public APIs do not offer:

- aiomqtt's paho client (``aiomqtt.Client._client``): to publish QoS 0 without waiting a loop
  turn per message, to see a PUBACK's reason code (aiomqtt reports a refused message as sent),
  to acknowledge a QoS 1 message only once the service is done with it (``_send_puback``),
  and to cut the socket when a disconnect hangs;
- for the fast read path (:mod:`offramp.bus.read_path`): paho's socket read (``_sock_recv``),
  its packet handler (``_packet_read`` replaced, ``_packet_handle``, ``_in_packet``), its
  acknowledgement (``_send_puback``), its in-flight accounting (``_out_messages``,
  ``_out_message_mutex``, ``_do_on_publish``) and its keepalive clock (``_msgtime_mutex``,
  ``_last_bytes_received``);
- for the fast write path (:mod:`offramp.bus.write_path`): its packet queue and write
  (``_out_packet``, ``_packet_write`` replaced, ``_sock_send``), its clock of the last packet out
  (``_last_msg_out``) and what its write does for a QoS 0 PUBLISH (``on_publish`` under
  ``_callback_mutex`` and ``_in_callback_mutex``, with ``_userdata``; ``_easy_log`` and
  ``suppress_exceptions`` when it raises).

Every one of them is reached through :class:`PahoHandle`, and :func:`check` makes sure they
all exist before the bus connects. A release that renames one then stops the service at start
with one error naming the versions installed, instead of an ``AttributeError`` that aiomqtt's
reader would swallow and report as a disconnect (an endless reconnect loop).
``OFFRAMP_BUS_READ_PATH=library`` leaves the read path to paho and needs only ``_client``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from offramp.errors import BusError

# What each part of the bus uses: checked by check() at start.
AIOMQTT_NAMES = ("_client",)
PAHO_NAMES = ("on_publish", "publish", "socket", "manual_ack_set", "_send_puback", "_out_packet")
READ_PATH_NAMES = ("_sock_recv", "_packet_read", "_packet_handle", "_in_packet", "_send_puback",
                   "_out_messages", "_out_message_mutex", "_do_on_publish", "_msgtime_mutex",
                   "_last_bytes_received", "_protocol",
                   # the fast write path (offramp.bus.write_path)
                   "_packet_write", "_sock_send", "_out_packet", "_last_msg_out",
                   "_callback_mutex", "_in_callback_mutex", "_userdata", "_easy_log",
                   "suppress_exceptions", "_callback_api_version")


def _versions() -> str:
    found = []
    for dist in ("paho-mqtt", "aiomqtt"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} (version unknown)")
    return " and ".join(found)


def missing_names(client: aiomqtt.Client, *, read_path: bool) -> list[str]:
    """The private names ``client`` (and its paho client) lack for the parts in use."""
    gone = [f"aiomqtt.Client.{n}" for n in AIOMQTT_NAMES if not hasattr(client, n)]
    paho = getattr(client, "_client", None)
    if paho is not None:
        names = (*PAHO_NAMES, *READ_PATH_NAMES) if read_path else PAHO_NAMES
        gone += [f"paho Client.{n}" for n in names if not hasattr(paho, n)]
    return gone


def check(*, read_path: bool) -> None:
    """Raise BusError, naming the installed versions, if anything the bus relies on is gone.
    Builds one unconnected client to look at (no I/O, in a running event loop)."""
    gone = missing_names(aiomqtt.Client("127.0.0.1", protocol=aiomqtt.ProtocolVersion.V5),
                         read_path=read_path)
    if gone:
        hint = ("; OFFRAMP_BUS_READ_PATH=library leaves the read path to paho"
                if read_path and not any(g.startswith("aiomqtt") for g in gone) else "")
        raise BusError(f"offramp's bus needs {', '.join(gone)}, which {_versions()} do not "
                       f"have: install aiomqtt>=2.5,<3 and paho-mqtt>=2.1,<3{hint}")


def paho_of(client: aiomqtt.Client) -> Any:
    """The paho client inside an aiomqtt client."""
    return client._client  # checked by check()


class PahoHandle:
    """A paho client, and the few private operations the bus performs on it."""

    def __init__(self, paho: Any) -> None:
        self.paho = paho
        self._ok = ReasonCode(PacketTypes.PUBACK)
        self._no_props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]

    # -- used by the bus whatever its read path ------------------------------------------------
    def publish(self, topic: str, payload: bytes | bytearray, qos: int,
                retain: bool) -> mqtt.MQTTMessageInfo:
        """paho's own publish: queues the packet for aiomqtt's socket writer and returns."""
        info: mqtt.MQTTMessageInfo = self.paho.publish(topic, payload, qos, retain)
        return info

    def publish_with(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool,
                     *, response_topic: str | None,
                     correlation_data: bytes | None) -> mqtt.MQTTMessageInfo:
        """paho's publish with MQTT v5's request/response properties."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        info: mqtt.MQTTMessageInfo = self.paho.publish(topic, payload, qos, retain, props)
        return info

    def wrap_write_registration(self, wrap: Callable[[Any, Any], tuple[Any, Any]]) -> None:
        """Replace paho's socket write (un)registration callbacks (aiomqtt's: add and remove
        the socket as a writer of its event loop) with ``wrap(register, unregister)``."""
        self.paho.on_socket_register_write, self.paho.on_socket_unregister_write = wrap(
            self.paho.on_socket_register_write, self.paho.on_socket_unregister_write)

    def write_pending(self) -> bool:
        """Whether paho has bytes queued that the socket did not take yet."""
        return bool(self.paho.want_write())

    def loop_write(self) -> MQTTErrorCode:
        """paho's write of its queued packets (through :class:`FastWritePath` when taken over)."""
        rc: MQTTErrorCode = self.paho.loop_write()
        return rc

    def manual_ack(self) -> None:
        """paho's own read path leaves QoS 1 acknowledgements to :meth:`send_puback`."""
        self.paho.manual_ack_set(True)

    def wrap_on_publish(self, wrap: Callable[[Any], Callable[..., None]]) -> None:
        """Replace paho's on-publish callback (aiomqtt's) with ``wrap(aiomqtt's)``."""
        self.paho.on_publish = wrap(self.paho.on_publish)

    def wrap_on_connect(self, seen: Callable[[Any], None]) -> None:
        """Call ``seen(CONNACK properties)`` before paho's on-connect callback (aiomqtt's)."""
        inner = self.paho.on_connect

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
            seen(props)
            inner(c, userdata, flags, reason, props)

        self.paho.on_connect = on_connect

    def queued_bytes(self) -> int:
        """Bytes of packets paho holds for the socket and has not written yet."""
        return sum(len(p["packet"]) - p["pos"] for p in list(self.paho._out_packet))

    def socket(self) -> socket.socket | None:
        sock: socket.socket | None = self.paho.socket()
        return sock

    def shutdown_socket(self) -> None:
        sock = self.paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- the fast read path ----------------------------------------------------------------------
    def speaks_v5(self) -> bool:
        return bool(self.paho._protocol == MQTTProtocolVersion.MQTTv5)

    def take_over_reads(self, read: Callable[[], MQTTErrorCode]) -> None:
        """paho's loop calls ``read`` where it would read a packet itself."""
        self.paho._packet_read = read  # an instance attribute shadows the method

    def recv(self, size: int) -> bytes:
        data: bytes = self.paho._sock_recv(size)
        return data

    def send_puback(self, mid: int) -> MQTTErrorCode:
        rc: MQTTErrorCode = self.paho._send_puback(mid)
        return rc

    def acknowledged(self, mid: int) -> MQTTErrorCode:
        """A successful PUBACK for ``mid``: paho's in-flight accounting and on-publish."""
        paho = self.paho
        with paho._out_message_mutex:
            if mid in paho._out_messages:
                rc: MQTTErrorCode = paho._do_on_publish(mid, self._ok, self._no_props)
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def handle_packet(self, command: int, body: bytes) -> MQTTErrorCode:
        """Give paho one whole packet to handle as if it had read it."""
        paho = self.paho
        paho._in_packet = _in_packet(command, body)
        try:
            rc: MQTTErrorCode = paho._packet_handle()
        except Exception:  # paho's MalformedPacket and its kin: the connection is broken
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        paho._in_packet = _in_packet(0, b"")  # as paho leaves it between packets
        return rc

    # -- the fast write path ---------------------------------------------------------------------
    def take_over_writes(self, write: Callable[[], MQTTErrorCode]) -> bool:
        """paho's loop calls ``write`` where it would write its queued packets itself; only
        for the callback API aiomqtt uses (its on_publish is called as paho calls it)."""
        if self.paho._callback_api_version != CallbackAPIVersion.VERSION2:
            return False
        self.paho._packet_write = write  # an instance attribute shadows the method
        return True

    def out_packets(self) -> Any:
        """paho's queue of packets to write (a deque of its packet records)."""
        return self.paho._out_packet

    def write_one_by_one(self) -> MQTTErrorCode:
        """paho's own packet write (a DISCONNECT, which it follows by closing)."""
        rc: MQTTErrorCode = type(self.paho)._packet_write(self.paho)
        return rc

    def sock_send(self, data: bytes) -> int:
        sent: int = self.paho._sock_send(data)
        return sent

    def published(self, packet: dict[str, Any]) -> None:
        """A QoS 0 PUBLISH written whole: what paho's write does for one."""
        paho = self.paho
        with paho._callback_mutex:
            on_publish = paho.on_publish
        if on_publish:
            with paho._in_callback_mutex:
                try:
                    on_publish(paho, paho._userdata, packet["mid"], self._ok, self._no_props)
                except Exception as err:
                    paho._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_publish: %s", err)
                    if not paho.suppress_exceptions:
                        raise
        packet["info"]._set_as_published()

    def mark_sent(self) -> None:
        """Tell paho's keepalive that a packet went out now."""
        paho = self.paho
        with paho._msgtime_mutex:
            paho._last_msg_out = time.monotonic()  # paho's clock

    def mark_received(self) -> None:
        """Tell paho's keepalive that bytes came in now."""
        paho = self.paho
        with paho._msgtime_mutex:
            paho._last_bytes_received = time.monotonic()  # paho's clock


def _in_packet(command: int, body: bytes) -> dict[str, Any]:
    """paho's record of a packet it has read whole (``command`` 0: none)."""
    return {"command": command, "have_remaining": int(command != 0), "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body), "packet": bytearray(body),
            "to_process": 0, "pos": 0}
