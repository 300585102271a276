"""``make demo`` / ``offramp demo``: broker, the four services, live heartbeats, clean stop."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from offramp.broker import LocalBroker
from offramp.bus import Bus
from offramp.errors import OfframpError, WireError
from offramp.launcher import ProcessGroup
from offramp.settings import BusSettings
from offramp.topics import Topics
from offramp.wire import Heartbeat

ROLES = {"admission-controller": "admission", "segment-worker": "worker",
         "exit-arbiter": "arbiter", "priority-scheduler": "scheduler"}


async def _watch(url: str, seconds: float, group: ProcessGroup
                 ) -> tuple[dict[str, int], dict[str, bool]]:
    settings = BusSettings(broker_url=url)
    topics = Topics(settings.topic_prefix)
    beats: dict[str, int] = defaultdict(int)
    online: dict[str, bool] = {}
    async with Bus(settings, f"offramp-demo-{os.getpid()}") as bus:
        sub = await bus.subscribe(topics.state_all())
        await bus.wait_connected(10)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = await asyncio.wait_for(sub.get(), end - time.monotonic())
            except TimeoutError:
                break
            try:
                hb = Heartbeat.decode(msg.payload)
            except WireError:
                continue
            if not msg.retain:
                beats[hb.node] += 1
            online[hb.node] = hb.online
        codes = await asyncio.to_thread(group.stop)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(online.get(n, True) for n in codes):
            try:
                msg = await asyncio.wait_for(sub.get(), max(0.01, deadline - time.monotonic()))
                hb = Heartbeat.decode(msg.payload)
                online[hb.node] = hb.online
            except (TimeoutError, WireError):
                continue
    return dict(beats), {**online, **{f"exit:{k}": v == 0 for k, v in codes.items()}}


def run_demo(seconds: float = 4.0) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="offramp-demo-") as tmp:
        url = os.environ.get("OFFRAMP_BROKER_URL", "")
        broker = None if url else LocalBroker()
        if broker is not None:
            broker.start()
            url = broker.url
        console.print(f"[bold]offramp demo[/]: broker {url}")
        group = ProcessGroup(Path(tmp), {"OFFRAMP_BROKER_URL": url, "OFFRAMP_LOG_FORMAT": "json"})
        try:
            for service in ROLES:
                group.add(service, f"{service}-1")
            beats, state = asyncio.run(_watch(url, seconds, group))
        finally:
            group.stop()
            if broker is not None:
                broker.close()
        table = Table(title=f"heartbeats in {seconds:.0f} s")
        for col in ("node", "heartbeats", "per second", "offline after stop", "exit code 0"):
            table.add_column(col)
        ok = True
        for service in ROLES:
            node = f"{service}-1"
            n = beats.get(node, 0)
            went_offline = state.get(node) is False
            clean = bool(state.get(f"exit:{node}"))
            ok = ok and n > 0 and went_offline and clean
            table.add_row(node, str(n), f"{n / seconds:.1f}", str(went_offline), str(clean))
        console.print(table)
        if not ok:
            for path in sorted(Path(tmp).glob("*.log")):
                console.print(f"[red]{path.name}[/]: {path.read_text()[-2000:]}")
            raise OfframpError("demo failed: a service did not heartbeat or stop cleanly")
        console.print("[green]all services heartbeated and stopped cleanly[/]")
    return 0
