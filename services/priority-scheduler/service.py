"""priority-scheduler: the control plane of placement (sources, nodes, the plan).

This issue's version connects, heartbeats on ``state/scheduler/{node}`` and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from offramp.service import Runtime
from offramp.settings import CommonSettings, nested

PREFIX = "OFFRAMP_SCHEDULER_"


@dataclass(frozen=True)
class SchedulerSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")


SETTINGS = SchedulerSettings  # what `offramp settings` and the entry point read


async def run(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    async with Runtime("scheduler", settings.common):
        await stop.wait()
