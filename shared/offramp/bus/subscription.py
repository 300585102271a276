"""What every bus shares, whatever carries its messages (MQTT or memory): received messages,
subscriptions with their bounded inboxes and decoders, and the routing of messages to them.

A subscription may decode: ``bus.subscribe(topic, decode=from_payload(Heartbeat.decode))`` yields
heartbeats, and a message that does not decode (a :class:`~offramp.errors.WireError` or
:class:`~offramp.errors.TopicError`) is counted per subscription, logged at most once a second
with its topic and error, and skipped: no service writes its own decode-or-skip loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, overload

import structlog
from paho.mqtt.matcher import MQTTMatcher

from offramp.bus.inbox import Inbox, Overflow, RateLimitedWarning
from offramp.bus.tcp_info import TcpInfo
from offramp.errors import TopicError, WireError

T = TypeVar("T")
U = TypeVar("U")
ROUTE_CACHE = 4096  # topics whose subscription is remembered
_UNSEEN: Any = object()


@dataclass(frozen=True, slots=True)
class Message:
    """A received message: topic, payload bytes, whether the broker replayed it as retained,
    when it arrived, and MQTT v5's request/response properties when the sender set them."""

    topic: str
    payload: bytes
    retain: bool = False
    received: float = 0.0
    response_topic: str | None = None
    correlation_data: bytes | None = None
    ack: tuple[int, int] | None = None  # (connection, packet id) to acknowledge; None: done


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(slots=True)
class BusStats:
    connects: int = 0
    reconnects: int = 0
    published: int = 0
    received: int = 0
    unrouted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # inbox name -> messages dropped
    undecodable: dict[str, int] = field(default_factory=dict)  # filter -> messages skipped


def from_payload(decode: Callable[[bytes], T]) -> Callable[[Message], T]:
    """A subscription decoder from a payload decoder (``Heartbeat.decode``, ...)."""
    return lambda msg: decode(msg.payload)


def raw(msg: Message) -> Message:
    return msg


class Subscription(Generic[T]):
    """One topic filter, its bounded inbox and its decoder. Iterate it, or call :meth:`get`."""

    def __init__(self, topic_filter: str, qos: int, inbox: Inbox[Message],
                 decode: Callable[[Message], T], *, shared_group: str | None,
                 undecodable: Callable[[Subscription[Any], Message, Exception], None],
                 close: Callable[[Subscription[Any]], Awaitable[None]],
                 detach: Callable[[Subscription[Any]], bool]) -> None:
        self.filter = topic_filter
        self.qos = qos
        self.inbox = inbox
        self.mqtt_filter = (f"$share/{shared_group}/{topic_filter}" if shared_group
                            else topic_filter)
        self._decode = decode
        self._undecodable = undecodable
        self._close = close
        self._detach = detach

    async def get(self) -> T:
        """The next message that decodes."""
        while True:
            msg = await self.inbox.get()
            try:
                return self._decode(msg)
            except (WireError, TopicError) as exc:
                self._undecodable(self, msg, exc)

    def get_nowait(self) -> T | None:
        """The next message that decodes, if one is queued now."""
        while (msg := self.inbox.get_nowait()) is not None:
            try:
                return self._decode(msg)
            except (WireError, TopicError) as exc:
                self._undecodable(self, msg, exc)
        return None

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            yield await self.get()

    async def close(self) -> None:
        """Unsubscribe (the broker is told, and its answer awaited)."""
        await self._close(self)

    def detach(self) -> None:
        """Stop taking this subscription's messages here, at once, without telling the broker
        (a stopping service: its disconnect ends the subscription anyway, and waiting for an
        unsubscribe acknowledgement behind a deep backlog could outlast its grace). What
        arrives afterwards is counted as unrouted."""
        self._detach(self)


class Router:
    """The subscriptions of one bus and the routing of received messages into their inboxes.
    A message goes to the first subscription its topic matches (filters must not overlap)."""

    def __init__(self, client_id: str, stats: BusStats, default_maxsize: int) -> None:
        self.client_id = client_id
        self.stats = stats
        self.default_maxsize = default_maxsize
        self.subs: list[Subscription[Any]] = []
        self._routes: dict[str, Subscription[Any] | None] = {}  # topic -> its subscription
        self._filters = self._matcher()
        self._log = structlog.get_logger("offramp.bus").bind(client_id=client_id)
        self._drop_warning = RateLimitedWarning()
        self._decode_warning = RateLimitedWarning()

    def cached_routes(self) -> int:
        """Topics whose subscription is cached now (bounded by ROUTE_CACHE)."""
        return len(self._routes)

    def add(self, topic_filter: str, qos: int, decode: Callable[[Message], U], *,
            maxsize: int | None, overflow: Overflow, shared_group: str | None,
            on_drop: Callable[[Message], None] | None,
            close: Callable[[Subscription[Any]], Awaitable[None]]) -> Subscription[U]:
        name = f"{self.client_id}:{topic_filter}"

        def dropped(inbox: str, item: Message, total: int) -> None:
            self.stats.dropped[inbox] = total
            if count := self._drop_warning.should_log():
                self._log.warning("inbox_overflow", inbox=inbox, dropped_now=count,
                                  dropped_total=total, topic=item.topic)
            if on_drop is not None:
                on_drop(item)

        inbox: Inbox[Message] = Inbox(name, maxsize or self.default_maxsize, overflow,
                                      on_drop=dropped)
        sub = Subscription(topic_filter, qos, inbox, decode, shared_group=shared_group,
                           undecodable=self._undecodable, close=close, detach=self.remove)
        self.subs.append(sub)
        self._changed()
        return sub

    def remove(self, sub: Subscription[Any]) -> bool:
        if sub not in self.subs:
            return False
        self.subs.remove(sub)
        self._changed()
        return True

    def _changed(self) -> None:
        self._routes.clear()
        self._filters = self._matcher()

    def _matcher(self) -> MQTTMatcher:
        """Filter -> (place, subscription) of the first subscription with that filter."""
        matcher = MQTTMatcher()  # type: ignore[no-untyped-call]
        for place, sub in reversed(list(enumerate(self.subs))):  # the first one stays
            matcher[sub.filter] = (place, sub)
        return matcher

    def _match(self, topic: str) -> Subscription[Any] | None:
        """The first subscription whose filter ``topic`` matches: one walk of a trie of the
        filters (paho's topic_matches_sub builds a trie per call, about 10 us a filter)."""
        found = min(self._filters.iter_match(topic), default=None,  # type: ignore[no-untyped-call]
                    key=lambda entry: entry[0])
        return None if found is None else found[1]

    def _undecodable(self, sub: Subscription[Any], msg: Message, exc: Exception) -> None:
        total = self.stats.undecodable[sub.filter] = self.stats.undecodable.get(sub.filter, 0) + 1
        if count := self._decode_warning.should_log():
            self._log.warning("undecodable_message", subscription=sub.filter, topic=msg.topic,
                              error=str(exc), skipped_now=count, skipped_total=total)

    def deliver(self, topic: str, data: bytes, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                ack: tuple[int, int] | None = None) -> None:
        msg = Message(topic, data, retain, time.time(), response_topic, correlation_data, ack)
        self.stats.received += 1
        sub = self._routes.get(topic, _UNSEEN)
        if sub is _UNSEEN:
            # topics repeat (one per source, node, segment), so each is matched once; the
            # cache is bounded, for a client that names a new source every frame
            sub = self._match(topic)
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            self._routes[topic] = sub
        if sub is None:
            self.stats.unrouted += 1
        else:
            sub.inbox.put(msg)


class Address(Protocol):
    def url(self) -> str: ...


class MessageBus:
    """What every bus offers (the MQTT :class:`~offramp.bus.connection.Bus`, the in-memory
    :class:`~offramp.bus.memory.MemoryBus`), and the subscribing they share. A bus adds how it
    connects and publishes, and how it tells its broker of a subscription."""

    address: Address
    connected: asyncio.Event

    def __init__(self, client_id: str, inbound_queue: int) -> None:
        self.client_id = client_id
        self.stats = BusStats()
        self.router = Router(client_id, self.stats, inbound_queue)

    async def __aenter__(self) -> Self:
        raise NotImplementedError

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not send the will)."""
        raise NotImplementedError

    def tcp_info(self) -> TcpInfo | None:
        """The kernel's counters of the connection to the broker (None: no TCP connection now,
        or a system that does not give them), for :class:`offramp.policy.links.LinkMeter`."""
        return None

    def unsent_bytes(self) -> int:
        """Bytes published and not yet taken by the network (0: none, or not known)."""
        return 0

    def max_payload(self, topic: str) -> int:
        """The largest payload a publish to ``topic`` may carry now (0: no limit)."""
        return 0

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once connected; BusError after ``timeout`` seconds."""
        raise NotImplementedError

    async def publish(self, topic: str, payload: bytes | bytearray | memoryview, *, qos: int = 0,
                      retain: bool = False, response_topic: str | None = None,
                      correlation_data: bytes | None = None) -> None:
        """Publish, or raise BusError saying why not. ``response_topic`` and
        ``correlation_data`` are MQTT v5's request/response properties."""
        raise NotImplementedError

    def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` to the broker now (a bus made with ``manual_ack``; otherwise, and
        for a message of an earlier connection, which the broker sends again, nothing)."""

    @overload
    async def subscribe(self, topic_filter: str, *, qos: int = ..., maxsize: int | None = ...,
                        overflow: Overflow = ..., shared_group: str | None = ...,
                        on_drop: Callable[[Message], None] | None = ...,
                        decode: None = ...) -> Subscription[Message]: ...

    @overload
    async def subscribe(self, topic_filter: str, *, qos: int = ..., maxsize: int | None = ...,
                        overflow: Overflow = ..., shared_group: str | None = ...,
                        on_drop: Callable[[Message], None] | None = ...,
                        decode: Callable[[Message], T]) -> Subscription[T]: ...

    async def subscribe(self, topic_filter: str, *, qos: int = 0, maxsize: int | None = None,
                        overflow: Overflow = "drop-oldest", shared_group: str | None = None,
                        on_drop: Callable[[Message], None] | None = None,
                        decode: Callable[[Message], Any] | None = None) -> Subscription[Any]:
        """Add a subscription that outlives reconnects; messages land in its bounded inbox
        (``maxsize``, default ``OFFRAMP_INBOUND_QUEUE``; ``overflow`` says which message goes
        when it is full, and ``on_drop`` is told of each after it is counted). With ``decode``
        the subscription yields decoded values and skips, counts and logs what does not
        decode."""
        sub = self.router.add(topic_filter, qos, decode or raw, maxsize=maxsize,
                              overflow=overflow, shared_group=shared_group, on_drop=on_drop,
                              close=self.unsubscribe)
        await self._remote_subscribe(sub)
        return sub

    async def unsubscribe(self, sub: Subscription[Any]) -> None:
        if self.router.remove(sub):
            await self._remote_unsubscribe(sub)

    async def _remote_subscribe(self, sub: Subscription[Any]) -> None:
        raise NotImplementedError

    async def _remote_unsubscribe(self, sub: Subscription[Any]) -> None:
        raise NotImplementedError
