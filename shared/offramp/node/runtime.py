"""A connected service: node name, topics, bus with will, heartbeats, health and metrics.

A service's ``run(settings, stop)`` opens a :class:`Runtime`, does its work until ``stop`` is
set, and returns; the runtime publishes the offline state and disconnects on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import structlog

from offramp.bus import Bus, MessageBus, Topics, Will, check_name
from offramp.errors import OfframpError, SettingsError
from offramp.node.health import HealthServer, Readiness
from offramp.node.metrics import Metrics, Reading
from offramp.node.telemetry import Telemetry
from offramp.node.tracing import Tracing
from offramp.settings import CommonSettings
from offramp.wire import Heartbeat

S = TypeVar("S")
HeartbeatBuilder = Callable[[Heartbeat], Heartbeat]


BusFactory = Callable[[str, Will | None], MessageBus]  # client id, will -> a bus


class Runtime:
    """A connected service: node name, topics, bus (with will) and the heartbeat task.

    The service says what its heartbeat carries with :meth:`heartbeat_with`: a function that
    gets the base heartbeat every period and returns the one to send, so a service adds its own
    queue state without owning the timing. ``bus`` makes the bus (default: MQTT to
    ``OFFRAMP_BROKER_URL``; tests pass an in-memory one). ``bundle`` is the identity of the
    model bundle the service serves, said in every heartbeat so that services started on
    different bundles can tell.
    """

    def __init__(self, role: str, common: CommonSettings, *,
                 bus: BusFactory | None = None, bundle: str = "") -> None:
        if not common.bus.broker_url and bus is None:
            raise SettingsError("OFFRAMP_BROKER_URL is not set: point it at your broker, "
                                "e.g. mqtt://127.0.0.1:1883 (offramp up starts one for you)")
        self.role = role
        self.bundle = bundle
        self.common = common
        self.node = check_name(common.node_name(), "OFFRAMP_NODE")
        self.topics = Topics(common.bus.topic_prefix)
        self.state_topic = self.topics.state(role, self.node)
        will = Will(self.state_topic, Heartbeat(role=role, node=self.node, online=False).encode())
        client_id = f"offramp-{role}-{self.node}"
        self.bus: MessageBus = (bus or (lambda c, w: Bus(common.bus, c, will=w)))(client_id, will)
        self.log = structlog.get_logger(f"offramp.{role}").bind(node=self.node)
        self._heartbeat: HeartbeatBuilder = lambda hb: hb
        self.draining = False  # said in every heartbeat from the moment it is set
        self._seq = 0
        self._tasks = contextlib.AsyncExitStack()
        self._hb_task: asyncio.Task[None] | None = None
        self._soon = asyncio.Event()
        self.early_beats = 0
        self.metrics = Metrics()
        self.tracing = Tracing(common.trace, role, self.node)
        self.telemetry = Telemetry(self.log, self.metrics, self.tracing)
        self._checks: list[Readiness] = []
        self.http: HealthServer | None = None
        self.metrics.on_collect(self._read_bus)

    def heartbeat_with(self, build: HeartbeatBuilder) -> None:
        """From now on, every heartbeat is ``build(base heartbeat)``."""
        self._heartbeat = build

    def require(self, check: Readiness) -> None:
        """Add a readiness condition: ``check()`` returns None when met, else what is missing."""
        self._checks.append(check)

    def readiness(self) -> str | None:
        if not self.bus.connected.is_set():
            return "not connected to the broker"
        return next((m for m in (c() for c in self._checks) if m is not None), None)

    def _read_bus(self, r: Reading) -> None:
        st = self.bus.stats
        r.gauge("offramp_bus_connected", "1 while connected to the broker",
                1.0 if self.bus.connected.is_set() else 0.0)
        r.counter("offramp_bus_reconnects_total", "Reconnects to the broker", st.reconnects)
        r.counter("offramp_bus_messages_received_total", "Messages received", st.received)
        r.counter("offramp_bus_messages_published_total", "Messages published", st.published)
        r.counter("offramp_heartbeats_early_total",
                  "Heartbeats sent before their period, to pass on credit", self.early_beats)
        for inbox, n in st.dropped.items():
            r.counter("offramp_inbox_dropped_total", "Messages an inbound queue dropped when full",
                      n, inbox=inbox.rsplit(":", 1)[-1])
        for subscription, n in st.undecodable.items():
            r.counter("offramp_messages_undecodable_total", "Messages skipped because they did "
                      "not decode, by subscription", n, subscription=subscription)

    async def __aenter__(self) -> Self:
        if self.common.http_port:
            self.http = HealthServer(self.common.http_host, self.common.http_port, self.metrics,
                                     self.readiness)
            try:
                await self.http.start()
            except OSError as exc:
                raise SettingsError(f"OFFRAMP_HTTP_PORT={self.common.http_port}: cannot listen "
                                    f"({exc})") from None
        await self.bus.__aenter__()
        tg = await self._tasks.enter_async_context(asyncio.TaskGroup())
        self._hb_task = tg.create_task(self._beat(), name=f"heartbeat:{self.node}")
        self.log.info("service_started", role=self.role, broker=self.bus.address.url())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._hb_task is not None:
            self._hb_task.cancel()
        await self._tasks.aclose()
        if self.bus.connected.is_set():
            with contextlib.suppress(OfframpError):
                offline = Heartbeat(role=self.role, node=self.node, online=False, seq=self._seq + 1,
                                    ts=time.time())
                await asyncio.wait_for(self._publish_state(offline), 2.0)
        await self.bus.close()
        if self.http is not None:
            await self.http.close()
        await asyncio.to_thread(self.tracing.close)  # exports the spans still held
        self.log.info("service_stopped", role=self.role)

    def base_heartbeat(self) -> Heartbeat:
        self._seq += 1
        return Heartbeat(role=self.role, node=self.node, online=True, seq=self._seq,
                         ts=time.time(), draining=self.draining, bundle=self.bundle)

    def drain(self) -> None:
        """Say in the heartbeat, now, that this service is stopping: it takes no new work."""
        self.draining = True
        self.beat_soon()

    async def _publish_state(self, hb: Heartbeat) -> None:
        await self.bus.publish(self.state_topic, hb.encode(), qos=0, retain=True)

    def beat_soon(self) -> None:
        """Send a heartbeat now rather than at the next period (no sooner than the heartbeat
        gap after the last one): it carries credit or a request some other node waits for."""
        self._soon.set()

    async def _beat(self) -> None:
        """Heartbeat on a fixed schedule (not sleep-after-send), skipping beats while offline;
        early ones in between, as asked, do not move the schedule."""
        period = self.common.heartbeat_s
        gap = min(period, self.common.heartbeat_gap_ms / 1000)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.bus.connected.wait()
            self._soon.clear()
            try:
                await self._publish_state(self._heartbeat(self.base_heartbeat()))
            except OfframpError as exc:
                self.log.warning("heartbeat_failed", error=str(exc))
            sent = loop.time()
            if sent >= next_at:  # the scheduled one (after an offline spell: a new schedule)
                next_at = next_at + period if next_at + period > sent else sent + period
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._soon.wait(), next_at - sent)
                self.early_beats += 1
                await asyncio.sleep(max(0.0, min(sent + gap, next_at) - loop.time()))
