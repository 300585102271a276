"""segment-worker: runs model segments, exits samples early, forwards the rest.

This issue's version connects, heartbeats on ``state/worker/{node}`` and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from offramp.service import Runtime
from offramp.settings import CommonSettings, nested

PREFIX = "OFFRAMP_WORKER_"


@dataclass(frozen=True)
class WorkerSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    async with Runtime("worker", settings.common):
        await stop.wait()
