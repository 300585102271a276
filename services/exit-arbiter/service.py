"""exit-arbiter: the control plane of exit policy (thresholds from calibration curves).

This issue's version connects, heartbeats on ``state/arbiter/{node}`` and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from offramp.service import Runtime
from offramp.settings import CommonSettings, nested

PREFIX = "OFFRAMP_ARBITER_"


@dataclass(frozen=True)
class ArbiterSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")


async def run(settings: ArbiterSettings, stop: asyncio.Event) -> None:
    async with Runtime("arbiter", settings.common):
        await stop.wait()
