"""admission-controller: owns every frame from ingest to its one result.

This issue's version connects, heartbeats on ``state/admission/{node}`` and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from offramp.service import Runtime
from offramp.settings import CommonSettings, nested

PREFIX = "OFFRAMP_ADMISSION_"


@dataclass(frozen=True)
class AdmissionSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")


async def run(settings: AdmissionSettings, stop: asyncio.Event) -> None:
    async with Runtime("admission", settings.common):
        await stop.wait()
