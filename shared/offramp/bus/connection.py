"""The MQTT bus every service uses: a thin, supervised wrapper over aiomqtt.

- MQTT v5, a stable client id, a will message on the node's ``state/...`` topic.
- Reconnects with jittered exponential backoff; on every (re)connect it subscribes again, which
  also makes the broker send retained control messages again.
- Each subscription has its own bounded :class:`~offramp.bus.inbox.Inbox` with a named overflow
  policy; drops are counted and logged. Messages are routed into inboxes on the event loop as
  they are read, with no extra task per message: :mod:`offramp.bus.read_path` parses PUBLISH and
  PUBACK packets itself (paho's read path cost more than half of a QoS 1 message's CPU), and
  what paho still handles arrives through aiomqtt's queue hook. What paho queues to send goes
  out joined, in one send per batch (:mod:`offramp.bus.write_path`).
- Subscription filters must not overlap: a message goes to the first subscription it matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from offramp.bus import paho_internals, tcp_info
from offramp.bus.paho_internals import PahoHandle, paho_of
from offramp.bus.read_path import FastReadPath, Incoming
from offramp.bus.subscription import Message, MessageBus, Subscription, Will
from offramp.bus.tcp_info import TcpInfo
from offramp.bus.write_path import FastWritePath, WriteSoon
from offramp.errors import BusError, RefusedError
from offramp.settings import BrokerAddress, BusSettings

# A PUBLISH packet beside its topic and payload: fixed header, lengths, packet id and the
# response properties the bus sends (a bound, not an exact count)
PUBLISH_OVERHEAD = 512

Props = tuple[str | None, bytes | None]  # response topic, correlation data


def _send(paho: PahoHandle, topic: str, payload: bytes | bytearray, qos: int, retain: bool,
          props: Props) -> mqtt.MQTTMessageInfo:
    if props == (None, None):
        info = paho.publish(topic, payload, qos, retain)
    else:
        info = paho.publish_with(topic, payload, qos, retain, response_topic=props[0],
                                 correlation_data=props[1])
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
    return info


class _Acks:
    """QoS 1/2 publishes waiting for their acknowledgement, keyed by message id, on one
    connection. Paho's on-publish callback (on the event loop, from aiomqtt's socket reader)
    resolves them; a lost connection fails every one, so its callers publish again on the next.
    One future per message: aiomqtt's publish (wrapped to fail on a lost connection) spent an
    event, three tasks and a timer on each, a visible share of a service's CPU at hundreds of
    messages a second. A PUBACK with a failure reason (MQTT v5: the ACL said no) is a BusError
    at once; aiomqtt reported it as success, and the message was silently lost."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def install(self, paho: PahoHandle) -> None:
        def wrap(inner: Any) -> Any:  # aiomqtt's callback (paho types it loosely)
            def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
                fut = self._waiting.pop(mid, None)
                if fut is None:
                    inner(c, userdata, mid, reason, props)  # QoS 0, or a publish aiomqtt made
                elif not fut.done():
                    if getattr(reason, "is_failure", False):
                        fut.set_exception(RefusedError(f"the broker refused the message: "
                                                       f"{reason}"))
                    else:
                        fut.set_result(None)
            return on_publish

        paho.wrap_on_publish(wrap)

    def publish(self, paho: PahoHandle, topic: str, payload: bytes | bytearray, qos: int,
                retain: bool, props: Props) -> asyncio.Future[None]:
        info = _send(paho, topic, payload, qos, retain, props)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if info.is_published():
            fut.set_result(None)
        else:
            self._waiting[info.mid] = fut
        return fut

    def lost(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(aiomqtt.MqttError("connection lost before the broker "
                                                    "acknowledged"))


class _Incoming(asyncio.Queue[Any]):
    """aiomqtt's incoming queue, replaced (``queue_type``, a public argument of aiomqtt's
    client): every message paho handled goes straight into its inbox."""

    def __init__(self, route: Callable[[aiomqtt.Message], None], maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._route = route

    def put_nowait(self, item: Any) -> None:
        self._route(item)


class Bus(MessageBus):
    """A supervised MQTT connection. Use as ``async with Bus(settings, client_id) as bus:``."""

    address: BrokerAddress

    def __init__(self, settings: BusSettings, client_id: str, *, will: Will | None = None,
                 address: BrokerAddress | None = None, manual_ack: bool = False,
                 receive_maximum: int = 0) -> None:
        """``manual_ack``: QoS 1 messages are acknowledged by :meth:`ack`, not on arrival, and
        a crash hands the unacknowledged ones to the next client with this id (the session).
        ``receive_maximum`` (MQTT v5, 0: the broker's default) bounds how many the broker
        sends before some are acknowledged."""
        super().__init__(client_id, settings.inbound_queue)
        self.manual_ack = manual_ack
        self.receive_maximum = receive_maximum
        self._generation = 0  # counts connections: a packet id is only valid on its own
        self.settings = settings
        self.address = address or settings.address()
        self.will = will
        self.connected = asyncio.Event()
        self._connection: aiomqtt.Client | None = None
        self._paho: PahoHandle | None = None  # the current connection's paho client
        self._acks = _Acks()
        # MQTT v5 CONNACK's Maximum Packet Size: what this broker takes (0: it set no limit)
        self.broker_max_packet = 0
        self.inbound: FastReadPath | None = None  # the fast read path of the current connection
        self.outbound: FastWritePath | None = None  # ... and its fast write path
        self.write_soon: WriteSoon | None = None  # ... and when that path writes
        self._task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._closing = False
        self._log = structlog.get_logger("offramp.bus").bind(client_id=client_id)

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        """Check the libraries' internals the bus relies on (BusError naming their versions if
        one is missing), then connect in the background, and reconnect whenever it drops."""
        paho_internals.check(read_path=self.settings.bus_read_path == "fast")
        # The connection's task lives in a task group of the bus's owner: an error the bus
        # does not expect stops the owner (the service exits and is restarted) instead of
        # leaving it disconnected for good without a word.
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = tg.create_task(self._supervise(), name=f"bus:{self.client_id}")
        return self

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not send the will) and stop reconnecting."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=3.0)
            if not done:
                # aiomqtt waits for the broker to close the socket after DISCONNECT, reading
                # one queued packet per loop turn; a busy broker or a deep socket backlog made
                # a stop outlast its grace. Cut the socket: the disconnect completes at once.
                self._log.warning("bus_disconnect_forced")
                self._shutdown_socket()
            self._task = None
            await self._stack.aclose()
        self.connected.clear()

    def max_payload(self, topic: str) -> int:
        """``OFFRAMP_MAX_MESSAGE_BYTES``, or less where the broker's maximum packet size (its
        CONNACK) leaves less room once the topic and the packet's other fields are counted."""
        cap = self.settings.max_message_bytes
        if self.broker_max_packet:
            cap = min(cap, self.broker_max_packet - len(topic) - PUBLISH_OVERHEAD)
        return max(1, cap)

    def tcp_info(self) -> TcpInfo | None:
        paho = self._paho
        return tcp_info.read(paho.socket()) if paho is not None else None

    def unsent_bytes(self) -> int:
        """What this client has published and the broker has not received yet: paho's queue,
        the socket's unsent bytes and those sent but not acknowledged (queued on the way, or
        lost and to be sent again; 0 where the kernel does not say). Whatever is published
        next, a heartbeat too, arrives behind it."""
        paho = self._paho
        if paho is None:
            return 0
        info = tcp_info.read(paho.socket())
        kernel = info.notsent_bytes + info.unacked_bytes if info is not None else 0
        return paho.queued_bytes() + kernel

    def _shutdown_socket(self) -> None:
        if self._paho is not None:
            self._paho.shutdown_socket()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise BusError(
                f"no connection to {self.address.url()} within {timeout:.1f} s"
            ) from None

    # -- publish / subscribe ------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes | bytearray | memoryview, *, qos: int = 0,
                      retain: bool = False, response_topic: str | None = None,
                      correlation_data: bytes | None = None) -> None:
        """Publish; wait up to ``publish_timeout_s`` for a connection, then raise BusError.
        QoS 0 returns once the packet is queued (no acknowledgement to wait for): aiomqtt's
        publish would wait a loop turn per message for paho's callback, halving the rate."""
        if len(payload) > self.settings.max_message_bytes:
            raise BusError(
                f"message of {len(payload)} bytes to {topic} is over OFFRAMP_MAX_MESSAGE_BYTES"
            )
        limit = self.broker_max_packet
        if limit and len(payload) + len(topic) + PUBLISH_OVERHEAD > limit:
            raise BusError(
                f"message of {len(payload)} bytes to {topic} does not fit the broker's maximum "
                f"packet size of {limit} bytes (Mosquitto: max_packet_size)"
            )
        deadline = time.monotonic() + self.settings.publish_timeout_s
        data = bytes(payload) if isinstance(payload, memoryview) else payload
        props = (response_topic, correlation_data)
        while True:
            paho = self._paho
            if paho is not None and self.connected.is_set():
                try:
                    if qos == 0:
                        _send(paho, topic, data, 0, retain, props)
                    else:
                        await self._acks.publish(paho, topic, data, qos, retain, props)
                    self.stats.published += 1
                    return
                except aiomqtt.MqttError as exc:
                    # Only the supervisor marks the bus (dis)connected: it alone knows whether
                    # this connection is gone or a new one is already up.
                    self._log.debug("publish_retry", topic=topic, error=str(exc))
                    await asyncio.sleep(0.01)
            remaining = deadline - time.monotonic()
            if self._closing or remaining <= 0:
                raise BusError(f"could not publish to {topic}: not connected to "
                               f"{self.address.url()}")
            if not self.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.connected.wait(), remaining)

    async def _remote_subscribe(self, sub: Subscription[Any]) -> None:
        client = self._connection
        if client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):  # a reconnect resubscribes
                await client.subscribe(sub.mqtt_filter, sub.qos)

    async def _remote_unsubscribe(self, sub: Subscription[Any]) -> None:
        client = self._connection
        if client is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(sub.mqtt_filter)

    # -- internals ----------------------------------------------------------------------------
    def _route(self, message: aiomqtt.Message) -> None:
        """A message paho handled itself (all of them with the library read path)."""
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        props = message.properties
        manual = self.manual_ack and message.qos == 1
        self._deliver(Incoming(message.topic.value, data, bool(message.retain),
                               getattr(props, "ResponseTopic", None),
                               getattr(props, "CorrelationData", None),
                               message.mid if manual else 0))

    def _connack(self, props: Any) -> None:
        self.broker_max_packet = int(getattr(props, "MaximumPacketSize", 0) or 0)

    def _deliver(self, m: Incoming) -> None:
        ack = (self._generation, m.packet_id) if m.packet_id else None
        self.router.deliver(m.topic, m.payload, m.retain, m.response_topic, m.correlation_data,
                            ack)

    def ack(self, msg: Message) -> None:
        paho = self._paho
        if msg.ack is None or paho is None or msg.ack[0] != self._generation:
            return  # nothing to acknowledge, or the broker sends it again on this connection
        paho.send_puback(msg.ack[1])

    def _client_kwargs(self) -> dict[str, Any]:
        addr = self.address
        kwargs: dict[str, Any] = {
            "hostname": addr.host, "port": addr.port, "identifier": self.client_id,
            "protocol": aiomqtt.ProtocolVersion.V5, "keepalive": self.settings.keepalive_s,
            "username": addr.username, "password": addr.password, "timeout": 10,
            "queue_type": lambda maxsize=0: _Incoming(self._route, maxsize),
        }
        if self.will is not None:
            kwargs["will"] = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos,
                                          self.will.retain)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
            kwargs["properties"] = props
        if self.settings.session_expiry_s > 0:
            props.SessionExpiryInterval = self.settings.session_expiry_s
            kwargs["properties"] = props
            # Never start clean. Each reconnect makes a new aiomqtt client, whose own "clean
            # start first only" would throw the session (and the QoS 1 messages queued in it)
            # away; and Mosquitto 2.0 does not save a session that began with clean start
            # across its own restart, even with an expiry (measured: frames published between
            # a broker restart and our resubscribe were lost). A restarted service therefore
            # resumes its session too, and gets what was queued for it while it was away.
            kwargs["clean_start"] = False
        if addr.tls:
            ctx = ssl.create_default_context(cafile=self.settings.tls_ca or None)
            kwargs["tls_context"] = ctx
        return kwargs

    async def _supervise(self) -> None:
        delay = self.settings.reconnect_min_s
        while True:
            try:
                client = aiomqtt.Client(**self._client_kwargs())
                paho = PahoHandle(paho_of(client))
                self._generation += 1
                if self.settings.bus_read_path == "fast":
                    self.inbound = FastReadPath(paho, self._deliver, manual_ack=self.manual_ack)
                    self.inbound.install()  # before it connects: CONNACK comes this way too
                    self.outbound = FastWritePath(paho)
                    self.outbound.install()
                    self.write_soon = WriteSoon(paho, asyncio.get_running_loop())
                    self.write_soon.install()
                elif self.manual_ack:
                    paho.manual_ack()
                paho.wrap_on_connect(self._connack)
                async with client:
                    tcp_info.no_delay(paho.socket())
                    self._acks.install(paho)
                    self._connection, self._paho = client, paho
                    for sub in list(self.router.subs):
                        await client.subscribe(sub.mqtt_filter, sub.qos)
                    self.stats.connects += 1
                    if self.stats.connects > 1:
                        self.stats.reconnects += 1
                    self.connected.set()
                    delay = self.settings.reconnect_min_s
                    self._log.info("bus_connected", broker=self.address.url(),
                                   subscriptions=len(self.router.subs),
                                   connects=self.stats.connects)
                    async for _ in client.messages:  # the router takes messages; this only ends
                        pass  # pragma: no cover     # when the connection drops
            except aiomqtt.MqttError as exc:
                self._log.warning("bus_disconnected", error=str(exc), retry_in_s=round(delay, 3))
            finally:
                self.connected.clear()
                self._acks.lost()
                self._connection, self._paho = None, None
            if self._closing:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.settings.reconnect_max_s)
