"""The live view of a running system, drawn from what any broker carries: heartbeats, paces
and results. ``offramp up`` shows it for the system it started; ``offramp watch --view`` for
any deployment (compose, k3s, netbed) it can reach."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable

import numpy as np
from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from offramp.bus import Bus, Message, Topics, from_payload
from offramp.errors import WireError
from offramp.node.entry import stop_on_signals
from offramp.settings import BusSettings
from offramp.wire import Heartbeat, Pace, Result, read_results


class LiveView:
    """What `offramp up` and `offramp watch --view` show: results over the last seconds, each
    source's share of them and its pace, and each worker's segments.

    The tables fit 80 columns. ``done/s`` is what a segment finished (exited plus forwarded)
    between its last two heartbeats; ``can/s`` is what it could do at its measured service time,
    so an idle worker shows ``done/s`` 0 and a large ``can/s``. Frames that can get no result
    at all, as the admission-controllers count them in their heartbeats, are named in a
    line of their own, with the log event that tells more."""

    WINDOW_S = 5.0
    NO_RESULT = {"invalid_sources": "on a topic naming no valid source (invalid_source)",
                 "duplicate_frames": "repeating an answered frame id (duplicate_frame)"}
    UNSERVED = "answered error: no worker serves this bundle (bundle_unserved)"

    def __init__(self) -> None:
        self.workers: dict[str, Heartbeat] = {}
        self.done_rate: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], tuple[float, int]] = {}
        self.results: deque[tuple[float, Result]] = deque(maxlen=5000)
        self.status: Counter[str] = Counter()
        self.exited: list[tuple[str, int | None]] = []  # services that stopped: (node, code)
        self.admission: dict[str, dict[str, float]] = {}  # node -> its latest counts
        self.paces: dict[str, float] = {}  # source -> the rate it is told (control/pace)

    def add_state(self, hb: Heartbeat, now: float | None = None) -> None:
        if hb.role == "admission" and hb.online:
            self.admission[hb.node] = {k: hb.stats.get(k, 0.0)
                                       for k in [*self.NO_RESULT, "unserved"]}
        if hb.role != "worker":
            return
        if not hb.online:
            self.workers.pop(hb.node, None)
            return
        now = time.monotonic() if now is None else now
        self.workers[hb.node] = hb
        for s in hb.segments:
            key, done = (hb.node, s.segment), s.exited + s.forwarded
            last = self._last.get(key)
            if last is not None and now > last[0] and done >= last[1]:
                self.done_rate[key] = (done - last[1]) / (now - last[0])
            self._last[key] = (now, done)

    def add_pace(self, topics: Topics, msg: Message) -> None:
        """A message of ``control/pace/<source>``; an empty one withdraws it."""
        source = topics.parse(msg.topic).source
        if not msg.payload:
            self.paces.pop(source, None)
            return
        with contextlib.suppress(WireError):
            self.paces[source] = Pace.from_json(msg.payload).rate_hz

    def add_result(self, r: Result, now: float | None = None) -> None:
        self.results.append((time.monotonic() if now is None else now, r))
        self.status[r.status] += 1

    MAX_SOURCES = 8  # rows of the sources table: the busiest

    def _sources(self, recent: list[Result]) -> Table:
        by_source: dict[str, Counter[str]] = {}
        for r in recent:
            by_source.setdefault(r.source, Counter())[r.status] += 1
        table = Table(title="sources", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("source", no_wrap=True, overflow="ellipsis", max_width=24)
        for col in ("frames/s", "ok/s", "dropped/s", "other/s", "pace/s"):
            table.add_column(col, justify="right", no_wrap=True)
        names = sorted(set(by_source) | set(self.paces),
                       key=lambda s: -sum(by_source.get(s, Counter()).values()))
        for name in names[:self.MAX_SOURCES]:
            c = by_source.get(name, Counter())
            per_s = {k: v / self.WINDOW_S for k, v in c.items()}
            pace = self.paces.get(name)
            table.add_row(name, f"{sum(per_s.values()):.1f}", f"{per_s.get('ok', 0):.1f}",
                          f"{per_s.get('dropped', 0):.1f}",
                          f"{per_s.get('expired', 0) + per_s.get('error', 0):.1f}",
                          "-" if pace is None else f"{pace:.0f}")
        if len(names) > self.MAX_SOURCES:
            table.caption = f"and {len(names) - self.MAX_SOURCES} more"
        return table

    def render(self, now: float | None = None) -> Group:
        now = time.monotonic() if now is None else now
        recent = [r for t, r in self.results if now - t <= self.WINDOW_S]
        ok = [r for r in recent if r.status == "ok"]
        lat = [r.latency_ms.get("total", 0.0) for r in ok]
        exits = Counter(r.exit_index or 0 for r in ok)
        head = Table(title=f"results, last {self.WINDOW_S:.0f} s", box=box.SIMPLE_HEAD,
                     pad_edge=False)
        for col in ("frames/s", "by status (all)", "exit shares", "p50/p99 ms"):
            head.add_column(col)
        shares = " ".join(f"{k}:{exits[k] / len(ok):.2f}" for k in sorted(exits)) if ok else "-"
        p = (f"{np.percentile(lat, 50):.0f}/{np.percentile(lat, 99):.0f}" if lat else "-")
        head.add_row(f"{len(recent) / self.WINDOW_S:.1f}",
                     " ".join(f"{k}:{v}" for k, v in sorted(self.status.items())) or "-",
                     shares, p)
        workers = Table(title="workers", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
        workers.add_column("node (device)", no_wrap=True, overflow="ellipsis", max_width=22)
        for col in ("seg", "queue", "wait ms", "done/s", "can/s", "batch", "exits", "fwd"):
            workers.add_column(col, justify="right", no_wrap=True)
        for node, hb in sorted(self.workers.items()):
            for s in hb.segments:
                done = self.done_rate.get((node, s.segment))
                workers.add_row(f"{node} ({hb.device or '?'})", str(s.segment), str(s.queued),
                                f"{s.backlog_s * 1000:.0f}",
                                "-" if done is None else f"{done:.0f}", f"{s.service_rate:.0f}",
                                f"{s.mean_batch:.1f}", str(s.exited), str(s.forwarded))
        note = Text("wait ms: the queue's backlog; done/s: finished per second; can/s: what the "
                    "measured service time allows", style="dim")
        parts: list[Table | Text] = [head, self._sources(recent), workers, note]
        total = Counter[str]()
        for counts in self.admission.values():
            total.update(counts)
        said = [f"{total[k]:.0f} {what}" for k, what in self.NO_RESULT.items() if total[k]]
        if said:
            parts.append(Text("no result: " + "; ".join(said), style="bold yellow"))
        if total["unserved"]:
            parts.append(Text(f"{total['unserved']:.0f} {self.UNSERVED}", style="bold red"))
        if self.exited:
            parts.append(Text("stopped: " + ", ".join(f"{node} (exit code {code})"
                                                      for node, code in self.exited),
                              style="bold red"))
        return Group(*parts)


async def show_live(settings: BusSettings, view: LiveView, *, client_id: str,
                    exited: Callable[[], list[tuple[str, int | None]]] | None = None,
                    connect_timeout_s: float = 10.0) -> None:
    """Draw ``view`` from the broker of ``settings`` until Ctrl-C or SIGTERM; ``exited``
    names the services that stopped by themselves (``offramp up``'s own)."""
    topics = Topics(settings.topic_prefix)
    async with Bus(settings, client_id) as bus:
        await bus.wait_connected(connect_timeout_s)
        states = await bus.subscribe(topics.state_all(), maxsize=1024,
                                     decode=from_payload(Heartbeat.decode))
        results = await bus.subscribe(topics.results_all(), maxsize=100_000,
                                      decode=from_payload(read_results))
        paces = await bus.subscribe(topics.pace_all(), maxsize=1024)

        async def pump_states() -> None:
            async for hb in states:
                view.add_state(hb)

        async def pump_results() -> None:
            async for answers in results:  # a refusal answers many frames
                for result in answers:
                    view.add_result(result)

        async def pump_paces() -> None:
            async for msg in paces:
                view.add_pace(topics, msg)

        stop = stop_on_signals()
        async with asyncio.TaskGroup() as tg:
            pumps = [tg.create_task(pump()) for pump in (pump_states, pump_results, pump_paces)]
            try:
                with Live(view.render(), refresh_per_second=2) as live:
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)
                        if exited is not None:
                            view.exited = exited()
                        live.update(view.render())
            finally:
                for t in pumps:
                    t.cancel()
