"""``offramp up``, ``offramp publish`` and ``offramp watch``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from offramp.bus import Bus, Topics, from_payload
from offramp.cli.args import add_bus_options, bus_settings, positive
from offramp.cli.publish import register as register_publish
from offramp.local.broker import free_port
from offramp.local.launcher import interrupt_on_stop_signals
from offramp.local.system import LocalSystem
from offramp.model.bundle import load_bundle
from offramp.node.entry import stop_on_signals
from offramp.settings import BusSettings
from offramp.wire import Heartbeat, Result, read_results


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run the whole system locally with a live view")
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="model bundle")
    p.add_argument("--workers", type=positive, default=2, help="segment-workers, splitting the "
                   "segments by FLOPs")
    p.add_argument("--port", type=int, default=1883, help="broker port (a free one if taken)")
    p.add_argument("--prefix", default="offramp/v1", help="topic prefix")
    p.add_argument("--logs", type=Path, default=None, help="folder for the services' logs, one "
                   "file per service, kept after the stop (None: a new folder under the "
                   "system's temporary directory, printed)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("OFFRAMP_HTTP_PORT") or
                                                        18080),
                   help="first port of the services' /livez, /readyz and /metrics, one per "
                        "service from there (the next free ones if taken; 0: none)")
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("watch", help="print results as they arrive, one JSON line each")
    add_bus_options(p)
    p.add_argument("--source", default="+", help="camera (source) id; + for all")
    p.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for "
                   "the broker at the start, then give up (once connected, a lost connection "
                   "is retried for as long as it takes)")
    p.set_defaults(handler=cmd_watch)
    register_publish(sub)


def cmd_watch(args: argparse.Namespace) -> int:
    settings = bus_settings(args)
    topics = Topics(args.prefix)
    topic = topics.results_all() if args.source == "+" else topics.results(args.source)

    async def go() -> None:
        async with Bus(settings, f"offramp-watch-{os.getpid()}") as bus:
            await bus.wait_connected(args.connect_timeout)
            sub = await bus.subscribe(topic, qos=1, maxsize=100_000)
            n = 0
            async for msg in sub:
                sys.stdout.write(msg.payload.decode(errors="replace") + "\n")
                sys.stdout.flush()
                n += 1
                if args.count and n >= args.count:
                    return

    asyncio.run(go())
    return 0


class LiveView:
    """What `offramp up` shows: results over the last seconds, and each worker's segments.

    Both tables fit 80 columns. ``done/s`` is what a segment finished (exited plus forwarded)
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

    def add_result(self, r: Result, now: float | None = None) -> None:
        self.results.append((time.monotonic() if now is None else now, r))
        self.status[r.status] += 1

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
        parts: list[Table | Text] = [head, workers, note]
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


def cmd_up(args: argparse.Namespace) -> int:
    interrupt_on_stop_signals()
    bundle = load_bundle(args.bundle)
    from offramp.local.broker import LocalBroker, free_run

    port = args.port if _free_to_listen(args.port) else free_port()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="offramp-up-"))
    services = args.workers + 3  # arbiter, scheduler, workers, admission-controller
    http = free_run(services, args.http_port) if args.http_port else 0
    broker = LocalBroker(port)
    broker.start()
    system = LocalSystem(bundle, args.workers, broker_url=broker.url, prefix=args.prefix,
                         logdir=logs, http_base=http)
    view = LiveView()
    topics = Topics(args.prefix)
    system.start()
    print(_header(system, broker.url, port, topics, logs))
    try:
        asyncio.run(_live(system, BusSettings(broker_url=broker.url, topic_prefix=args.prefix),
                          view))
    except KeyboardInterrupt:
        pass
    finally:
        codes = system.stop()
        broker.close()
        print("\n" + json.dumps({"stopped": codes, "logs": str(logs)}))
    for node, code in view.exited:
        print(f"offramp up: {node} exited with code {code}; its log: {logs / node}.log",
              file=sys.stderr)
    return 1 if view.exited else 0


def _free_to_listen(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return False
    except OSError:
        return True


async def _live(system: LocalSystem, settings: BusSettings, view: LiveView) -> None:
    """The live view until Ctrl-C; a service that stops by itself is named in it in red (the
    others go on: a worker or an admission-controller may be killed on purpose, to watch the
    system ride it out)."""
    topics = Topics(settings.topic_prefix)
    async with Bus(settings, f"offramp-up-{os.getpid()}") as bus:
        states = await bus.subscribe(topics.state_all(), maxsize=1024,
                                     decode=from_payload(Heartbeat.decode))
        results = await bus.subscribe(topics.results_all(), maxsize=100_000,
                                      decode=from_payload(read_results))

        async def pump_states() -> None:
            async for hb in states:
                view.add_state(hb)

        async def pump_results() -> None:
            async for answers in results:  # a refusal answers many frames
                for result in answers:
                    view.add_result(result)

        stop = stop_on_signals()
        async with asyncio.TaskGroup() as tg:
            pumps = [tg.create_task(pump_states()), tg.create_task(pump_results())]
            try:
                with Live(view.render(), refresh_per_second=2) as live:
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)
                        assert system.group is not None
                        view.exited = system.group.exited()
                        live.update(view.render())
            finally:
                for t in pumps:
                    t.cancel()


def _header(system: LocalSystem, url: str, port: int, topics: Topics, logs: Path) -> str:
    lines = [f"offramp up: broker {url}; {system.workers} workers on {system.bundle.name}",
             f"  publish: offramp publish --broker {url} --rate 50",
             f"  results: mosquitto_sub -p {port} -t '{topics.results_all()}'",
             f"  logs:    {logs}/<service>.log (kept)"]
    ports = system.http_ports()
    if ports:
        lines.append("  health and metrics: " + ", ".join(
            f"{node} :{p}" for node, p in ports.items()) + " (/livez /readyz /metrics)")
    return "\n".join([*lines, "  Ctrl-C stops."])
