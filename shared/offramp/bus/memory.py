"""A bus in memory, for tests that build services in one process: the same interface as
:class:`~offramp.bus.connection.Bus` (subscribe with inboxes and decoders, publish, retained
messages, wills, connection state), with a :class:`MemoryBroker` in place of Mosquitto.

Delivery is immediate and in order, as one broker delivers to one subscriber; a message goes
to every bus with a matching subscription (and to the first matching subscription of each).
Shared subscriptions are delivered to one member in turn, as Mosquitto does. QoS is accepted
and has nothing to do: nothing is lost in memory. :meth:`MemoryBus.crash` drops a bus without
a clean disconnect, so its will is published, as the broker would on a lost connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from itertools import count
from types import TracebackType
from typing import Any, Self

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.matcher import MQTTMatcher

from offramp.bus.subscription import MessageBus, Subscription, Will
from offramp.errors import BusError

DEFAULT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class MemoryAddress:
    name: str

    def url(self) -> str:
        return f"memory://{self.name}"


_Entries = dict[tuple["MemoryBus", str], tuple[int, bool]]


class MemoryBroker:
    """Routes messages between the :class:`MemoryBus` clients attached to it and keeps
    retained messages, as one broker would."""

    def __init__(self, name: str = "broker") -> None:
        self.address = MemoryAddress(name)
        self.retained: dict[str, bytes] = {}
        self._clients: dict[str, MemoryBus] = {}
        self._turns = count()
        # topic filter -> {(bus, MQTT filter): (order subscribed, shared)}: one trie walk per
        # message finds every subscription it goes to, however many there are
        self._subs = MQTTMatcher()  # type: ignore[no-untyped-call]
        self._order = count()

    def attach(self, bus: MemoryBus) -> None:
        if bus.client_id in self._clients:
            self._clients[bus.client_id].crash()  # a client id takes over the older session
        self._clients[bus.client_id] = bus

    def subscribe(self, bus: MemoryBus, topic_filter: str, mqtt_filter: str) -> None:
        try:
            entries: _Entries = self._subs[topic_filter]
        except KeyError:
            entries = self._subs[topic_filter] = {}
        entries.setdefault((bus, mqtt_filter), (next(self._order), mqtt_filter != topic_filter))

    def unsubscribe(self, bus: MemoryBus, topic_filter: str, mqtt_filter: str) -> None:
        try:
            entries: _Entries = self._subs[topic_filter]
        except KeyError:
            return
        entries.pop((bus, mqtt_filter), None)
        if not entries:
            del self._subs[topic_filter]  # type: ignore[no-untyped-call]

    def detach(self, bus: MemoryBus, *, clean: bool) -> None:
        for topic_filter, mqtt_filter in bus.remote:
            self.unsubscribe(bus, topic_filter, mqtt_filter)
        if self._clients.get(bus.client_id) is bus:
            del self._clients[bus.client_id]
            if not clean and bus.will is not None:
                w = bus.will
                self.publish(w.topic, w.payload, w.retain)

    def publish(self, topic: str, payload: bytes, retain: bool,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)  # an empty retained message clears the topic
        first: dict[MemoryBus, tuple[int, bool, str]] = {}  # each bus's first matching filter
        entries: _Entries
        for entries in self._subs.iter_match(topic):  # type: ignore[no-untyped-call]
            for (bus, mqtt_filter), (order, shared) in entries.items():
                if bus not in first or order < first[bus][0]:
                    first[bus] = (order, shared, mqtt_filter)
        groups: dict[str, list[MemoryBus]] = {}
        for bus, (_, shared, mqtt_filter) in first.items():
            if shared:  # $share/<group>/...: one member of a group
                groups.setdefault(mqtt_filter, []).append(bus)
            else:
                bus.router.deliver(topic, payload, False, response_topic, correlation_data)
        for members in groups.values():
            members[next(self._turns) % len(members)].router.deliver(
                topic, payload, False, response_topic, correlation_data)

    def replay_retained(self, bus: MemoryBus, topic_filter: str) -> None:
        for topic, payload in list(self.retained.items()):
            if topic_matches_sub(topic_filter, topic):
                bus.router.deliver(topic, payload, True)


class MemoryBus(MessageBus):
    """A client of a :class:`MemoryBroker`. Use as ``async with MemoryBus(broker, id) as bus``."""

    def __init__(self, broker: MemoryBroker, client_id: str, *, will: Will | None = None,
                 inbound_queue: int = 1024, max_message_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(client_id, inbound_queue)
        self.broker = broker
        self.address = broker.address
        self.will = will
        self.max_message_bytes = max_message_bytes
        self.connected = asyncio.Event()
        self.remote: list[tuple[str, str]] = []  # (filter, MQTT filter) the broker knows of

    async def __aenter__(self) -> Self:
        self.broker.attach(self)
        self.stats.connects += 1
        self.connected.set()
        for sub in self.router.subs:
            await self._remote_subscribe(sub)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly: the broker does not publish the will."""
        self.connected.clear()
        self.broker.detach(self, clean=True)

    def crash(self) -> None:
        """Drop the connection without a clean disconnect: the broker publishes the will."""
        self.connected.clear()
        self.broker.detach(self, clean=False)

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            raise BusError(f"no connection to {self.address.url()} within {timeout} s") from None

    async def publish(self, topic: str, payload: bytes | bytearray | memoryview, *, qos: int = 0,
                      retain: bool = False, response_topic: str | None = None,
                      correlation_data: bytes | None = None) -> None:
        if len(payload) > self.max_message_bytes:
            raise BusError(f"message of {len(payload)} bytes to {topic} is over "
                           "OFFRAMP_MAX_MESSAGE_BYTES")
        if not self.connected.is_set():
            raise BusError(f"could not publish to {topic}: not connected to "
                           f"{self.address.url()}")
        self.broker.publish(topic, bytes(payload), retain, response_topic, correlation_data)
        self.stats.published += 1

    async def _remote_subscribe(self, sub: Subscription[Any]) -> None:
        if self.connected.is_set():
            if (sub.filter, sub.mqtt_filter) not in self.remote:
                self.remote.append((sub.filter, sub.mqtt_filter))
            self.broker.subscribe(self, sub.filter, sub.mqtt_filter)
            self.broker.replay_retained(self, sub.filter)

    async def _remote_unsubscribe(self, sub: Subscription[Any]) -> None:
        if (sub.filter, sub.mqtt_filter) in self.remote:
            self.remote.remove((sub.filter, sub.mqtt_filter))
            self.broker.unsubscribe(self, sub.filter, sub.mqtt_filter)
