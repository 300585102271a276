"""How a service process starts and stops: its settings, logging, signals and parent.

Each service package describes itself with a :class:`ServiceSpec` (``SERVICE`` in its
``service`` module, registered under the entry-point group ``offramp.services``); its
``__main__`` calls :func:`main` with it. ``run(settings, stop)`` works until ``stop`` is set:
by SIGTERM or SIGINT, or when the process that started it is gone (the lifeline).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import structlog
from prometheus_client import disable_created_metrics

from offramp.bus import check_name
from offramp.errors import OfframpError, SettingsError
from offramp.node.log import configure_logging
from offramp.node.runtime import BusFactory
from offramp.settings import CommonSettings, load

ENTRY_POINTS = "offramp.services"


class ServiceSettings(Protocol):
    """A service's settings: its own fields, and the common ones under ``common``."""

    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=ServiceSettings)
S_contra = TypeVar("S_contra", bound=ServiceSettings, contravariant=True)


class RunService(Protocol[S_contra]):
    """A service's ``run``: works until ``stop`` is set, on buses ``connect`` makes (default:
    MQTT to the broker its settings name; in memory for a system in one process)."""

    def __call__(self, settings: S_contra, stop: asyncio.Event, *,
                 connect: BusFactory | None = None) -> Awaitable[None]: ...


@dataclass(frozen=True)
class ServiceSpec(Generic[S]):
    """What a service is, for its entry point, ``offramp settings`` and the launcher."""

    name: str  # as in services/<name>/ and the images: "segment-worker"
    module: str  # what ``python -m`` runs: "segment_worker"
    settings: type[S]
    prefix: str  # its own variables: "OFFRAMP_WORKER_"
    run: RunService[S]


def main(service: ServiceSpec[S]) -> int:
    """Entry point: load settings (one clear line on error), configure logging, run until signal."""
    try:
        settings = load(service.settings, service.prefix)
        common = settings.common
        configure_logging(common.log_level, common.log_format)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        check_name(common.node_name(), "OFFRAMP_NODE")
        if common.lifeline_fd >= 0:
            check_lifeline(common.lifeline_fd)
    except OfframpError as exc:
        print(f"offramp: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_until_signal(settings, service.run, common.lifeline_fd))
    except OfframpError as exc:
        structlog.get_logger("offramp").error("service_failed", error=str(exc))
        return 1
    return 0


async def _run_until_signal(settings: S, run: Callable[[S, asyncio.Event], Awaitable[None]],
                            lifeline_fd: int) -> None:
    stop = stop_on_signals()
    if lifeline_fd >= 0:
        stop_with_parent(lifeline_fd, stop)
    await run(settings, stop)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets (on the running loop): the way to stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def check_lifeline(fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise SettingsError(f"OFFRAMP_LIFELINE_FD={fd}: not an open file descriptor in this "
                            "process (only a parent that passes the pipe sets it)") from None


def stop_with_parent(fd: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the pipe's read end ``fd`` reaches end of file, that is when every
    write end is closed: the process that started this service is gone, however it died
    (SIGKILL included), so the service drains and exits rather than running on unowned."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            if os.read(fd, 4096):
                return  # nobody is meant to write; what comes is not an end
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)
        structlog.get_logger("offramp").warning("parent_gone", action="stopping")
        stop.set()

    loop.add_reader(fd, readable)
