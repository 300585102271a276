"""The whole system as tasks of one event loop on a broker in memory, with the shape of
:class:`~offramp.local.system.LocalSystem`: members by node name, workers added while it runs,
a member stopped as SIGTERM stops it (it drains) or crashed as SIGKILL would (its connections
drop without a goodbye, so the broker sends its will, and its task ends where it was).

For tests and tools that need every service but not processes: it starts in a second, and
what a test waits for is a message or a member's end, not the clock. What needs real
processes (signals, a real broker's sessions and wills, restarts) stays with ``LocalSystem``.

The services are found through their entry points (:mod:`offramp.local.services`), as
``offramp up`` finds them; the library imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from offramp.bus import MessageBus, Will
from offramp.bus.memory import MemoryBroker, MemoryBus
from offramp.errors import OfframpError
from offramp.local.services import service_specs
from offramp.local.system import bundle_env, split_segments
from offramp.model.bundle import Bundle
from offramp.node.entry import ServiceSpec
from offramp.settings import load


class Member:
    """One service running as a task; its connections are the broker's, in memory."""

    def __init__(self, spec: ServiceSpec[Any], node: str, env: Mapping[str, str],
                 broker: MemoryBroker) -> None:
        self.spec = spec
        self.node = node
        self.env = dict(env)
        self.broker = broker
        self.buses: list[MemoryBus] = []
        self.error: BaseException | None = None  # why it ended by itself, if it did
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _connect(self, client_id: str, will: Will | None) -> MessageBus:
        bus = MemoryBus(self.broker, client_id, will=will)
        self.buses.append(bus)
        return bus

    def start(self) -> None:
        """Run the service from its settings (``env``), as its process would."""
        settings = load(self.spec.settings, self.spec.prefix, self.env)
        self._stop = asyncio.Event()
        self.buses = []
        self.error = None
        self._task = asyncio.create_task(self._run(settings), name=self.node)

    async def _run(self, settings: Any) -> None:
        try:
            await self.spec.run(settings, self._stop, connect=self._connect)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a service that fails is the test's business, not the loop's
            self.error = exc
            raise

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stopped(self) -> None:
        """Wait until the service has ended (by itself, a stop or a crash)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(self._task)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop as on SIGTERM: the service drains and ends; raises what it failed with."""
        if self._task is None or self._task.done():
            return
        self._stop.set()
        await asyncio.wait_for(self.stopped(), timeout)
        if self.error is not None:
            raise OfframpError(f"{self.node} failed: {self.error!r}") from self.error

    async def crash(self) -> None:
        """End as on SIGKILL: every connection drops at once (the broker sends the wills),
        and the task is cancelled wherever it is."""
        for bus in self.buses:
            bus.crash()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await self.stopped()


class InProcessSystem:
    """The exit-arbiter, the priority-scheduler, ``workers`` segment-workers splitting
    ``bundle`` and an admission-controller (and, with ``standby``, a second one standing
    by), on one :class:`MemoryBroker`. Use as ``async with InProcessSystem(...) as system``."""

    def __init__(self, bundle: Bundle, workers: int = 2, *, prefix: str = "inproc",
                 env: Mapping[str, str] | None = None, standby: bool = False,
                 http_base: int = 0) -> None:
        self.bundle = bundle
        self.workers = workers
        self.prefix = prefix
        self.env = dict(env or {})
        self.standby = standby
        self.http_base = http_base  # first port of the members' /metrics, one each (0: none)
        self.broker = MemoryBroker()
        self.members: list[Member] = []
        self.assignment: list[tuple[int, ...]] = []
        self._specs = service_specs()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def base_env(self) -> dict[str, str]:
        return {"OFFRAMP_TOPIC_PREFIX": self.prefix, "OFFRAMP_LOG_LEVEL": "warning",
                **bundle_env(str(self.bundle.root)), **self.env}

    def add(self, service: str, node: str, env: Mapping[str, str] | None = None) -> Member:
        """Start ``service`` as ``node`` (``env`` on top of the system's)."""
        if service not in self._specs:
            raise OfframpError(f"no service named {service!r}; installed: {sorted(self._specs)}")
        if any(m.node == node for m in self.members):
            raise OfframpError(f"a member named {node!r} is already in the system")
        http = {"OFFRAMP_HTTP_PORT": str(self.http_base + len(self.members))} \
            if self.http_base else {}
        member = Member(self._specs[service], node,
                        {**self.base_env(), "OFFRAMP_NODE": node, **http, **(env or {})},
                        self.broker)
        self.members.append(member)
        member.start()
        return member

    def start(self) -> None:
        self.assignment = split_segments([s.flops for s in self.bundle.manifest.segments],
                                         self.workers)
        self.add("exit-arbiter", "arbiter-1")
        self.add("priority-scheduler", "scheduler-1")
        for i, segments in enumerate(self.assignment):
            self.add_worker(f"worker-{i + 1}", segments)
        self.add("admission-controller", "admission-1")
        if self.standby:
            self.add("admission-controller", "admission-2", {"OFFRAMP_ADMISSION_STANDBY": "true"})

    def add_worker(self, node: str, segments: tuple[int, ...],
                   env: Mapping[str, str] | None = None) -> Member:
        return self.add("segment-worker", node,
                        {"OFFRAMP_WORKER_SEGMENTS": ",".join(map(str, segments)), **(env or {})})

    def member(self, node: str) -> Member:
        return next(m for m in self.members if m.node == node)

    def client(self, client_id: str) -> MemoryBus:
        """A connection of a camera or a test to the system's broker (``async with``)."""
        return MemoryBus(self.broker, client_id)

    def failed(self) -> dict[str, BaseException]:
        """The members that ended with an error: node -> the error."""
        return {m.node: m.error for m in self.members if m.error is not None}

    async def stop(self) -> None:
        """Stop every running member as on SIGTERM, the admission-controllers first (they
        answer what they hold), then the rest at once; every one is stopped before the first
        failure among them is raised."""
        running = [m for m in self.members if m.running]
        first = [m for m in running if m.spec.name == "admission-controller"]
        outcomes: list[BaseException | None] = []
        for m in first:  # one at a time: what the active one leaves, its standby takes and answers
            outcomes += await asyncio.gather(m.stop(), return_exceptions=True)
        outcomes += await asyncio.gather(*(m.stop() for m in running if m not in first),
                                         return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
