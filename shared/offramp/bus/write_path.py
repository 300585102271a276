"""The bus's fast write path: the packets paho has queued go to the socket in one send.

paho-mqtt writes each queued packet with a ``send`` call of its own. An admission-controller
at five times its capacity acknowledges thousands of frames a second (a PUBACK each) besides
its results and activation packets: a profile put a fifth of its main thread in those sends.
:class:`FastWritePath` takes paho's packet write over on one connection and joins what is
queued, up to ``WRITE_BYTES``, into one buffer and one ``send`` (TLS and websocket sockets
included: it goes through paho's own socket send). Then, for each packet written whole, it
does what paho does: a QoS 0 PUBLISH is reported published (``on_publish``), and paho's clock
of the last packet out is set. A DISCONNECT at the head of the queue is left to paho's own
write, which closes the connection after it.

:class:`WriteSoon` decides when that write happens. aiomqtt registers the socket as a writer
of the event loop whenever paho queues a packet (from any thread, so through the loop's
self-pipe) and removes it once the queue is written: two selector changes, two epoll_ctl calls
and a loop turn or two per write, a sixth of a busy worker's event loop in a profile. WriteSoon
writes on the next turn of the loop instead, everything queued by then in one send, and
registers the writer only while the socket takes no more.

The private names of paho it uses are reached through :class:`~offramp.bus.paho_internals.
PahoHandle`; ``OFFRAMP_BUS_READ_PATH=library`` leaves writes to paho and aiomqtt as well.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from offramp.bus.paho_internals import PahoHandle

WRITE_BYTES = 256 * 1024  # most bytes joined into one send
PUBLISH, DISCONNECT = 0x30, 0xE0


class FastWritePath:
    """Writes the packets of one paho client; see the module docstring."""

    def __init__(self, paho: PahoHandle) -> None:
        self._paho = paho
        self.sends = 0  # socket sends made
        self.packets = 0  # packets written whole

    def install(self) -> None:
        self._paho.take_over_writes(self.write)

    def write(self) -> MQTTErrorCode:
        """paho's ``_packet_write`` contract: SUCCESS when the queue is written, AGAIN when
        the socket takes no more now, CONN_LOST when it is gone."""
        paho = self._paho
        queue: deque[dict[str, Any]] = paho.out_packets()
        while queue:
            if queue[0]["command"] & 0xF0 == DISCONNECT:
                return paho.write_one_by_one()
            batch: list[dict[str, Any]] = []
            size = 0
            for packet in queue:
                if packet["command"] & 0xF0 == DISCONNECT or (batch and size >= WRITE_BYTES):
                    break
                batch.append(packet)
                size += packet["to_process"]
            data = b"".join(memoryview(p["packet"])[p["pos"]:] for p in batch)
            try:
                written = paho.sock_send(data)
            except (AttributeError, ValueError):  # as paho: no socket any more
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            self.sends += 1
            if written <= 0:
                break
            for packet in batch:
                taken = min(written, packet["to_process"])
                packet["pos"] += taken
                packet["to_process"] -= taken
                written -= taken
                if packet["to_process"]:
                    break  # the rest of it goes with the next send
                queue.popleft()
                self.packets += 1
                if packet["command"] & 0xF0 == PUBLISH and packet["qos"] == 0:
                    paho.published(packet)
        paho.mark_sent()
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class WriteSoon:
    """Schedules paho's writes on one connection; see the module docstring."""

    def __init__(self, paho: PahoHandle, loop: asyncio.AbstractEventLoop) -> None:
        self._paho = paho
        self._loop = loop
        self._thread = threading.get_ident()  # the event loop's
        self._scheduled = False
        self._writer = False  # aiomqtt's writer is registered (the socket was full)
        self._register: Any = None
        self._unregister: Any = None
        self.flushes = 0  # writes made on a loop turn
        self.waits = 0  # ... that left bytes for the writer

    def install(self) -> None:
        self._paho.wrap_write_registration(self._wrap)

    def _wrap(self, register: Any, unregister: Any) -> tuple[Any, Any]:
        self._register, self._unregister = register, unregister
        return self._on_register, self._on_unregister

    def _on_register(self, client: Any, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._thread:  # paho's connect, on aiomqtt's thread
            self._writer = True
            self._register(client, userdata, sock)
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush, client, userdata, sock)

    def _flush(self, client: Any, userdata: Any, sock: Any) -> None:
        self._scheduled = False
        if self._writer:  # the writer is on: it writes when the socket takes more
            return
        self.flushes += 1
        try:
            self._paho.loop_write()
        except Exception:  # aiomqtt's writer meets it again and reports it
            failed = True
        else:
            failed = False
        if self._paho.socket() is not sock:  # closed meanwhile: nothing to write to
            return
        if failed or self._paho.write_pending():
            self.waits += 1
            self._writer = True
            self._register(client, userdata, sock)

    def _on_unregister(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._writer:
            self._writer = False
            self._unregister(client, userdata, sock)
