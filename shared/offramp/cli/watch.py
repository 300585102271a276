"""``offramp watch``: the results of a running system, from any broker it can reach: one JSON
line each (what a program reads), one line of 80 columns each (``--lines``, what a person
reads), or the live view (``--view``); filtered by source and status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable

from offramp.bus import Bus, Topics
from offramp.cli.args import add_bus_options, bus_settings
from offramp.cli.live import LiveView, show_live
from offramp.errors import OfframpError, WireError
from offramp.wire import STATUSES, Result, read_results

WIDTH = 80


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("watch", help="results as they arrive (JSON lines, lines to read, or "
                                     "the live view)",
                       description="Results of a running system, from any broker: one JSON "
                                   "line each (default), one line of 80 columns each "
                                   "(--lines), or the live view of results, sources, paces and "
                                   "workers (--view).")
    add_bus_options(p)
    p.add_argument("--source", default="+", help="camera (source) id; + for all")
    p.add_argument("--status", default="", help="only these statuses, comma-separated "
                   f"({', '.join(STATUSES)}; empty: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lines", action="store_true",
                      help="one line per frame, to read: time, source, frame id, status, "
                           "class, confidence, exit, latency (or the error)")
    mode.add_argument("--view", action="store_true",
                      help="the live view that offramp up shows, for any deployment")
    p.add_argument("--count", type=int, default=0, help="stop after this many frames' results "
                   "(0: never)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for "
                   "the broker at the start, then give up (once connected, a lost connection "
                   "is retried for as long as it takes)")
    p.set_defaults(handler=cmd_watch)


def statuses(text: str) -> frozenset[str]:
    wanted = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = wanted - set(STATUSES)
    if unknown:
        raise OfframpError(f"--status {text}: {', '.join(sorted(unknown))} is not a status "
                           f"({', '.join(STATUSES)})")
    return wanted or frozenset(STATUSES)


def line(r: Result) -> str:
    """One result in at most 80 columns."""
    at = time.strftime("%H:%M:%S", time.localtime(r.ts)) + f".{int(r.ts * 1000) % 1000:03d}" \
        if r.ts else "--:--:--.---"
    head = f"{at} {_cut(r.source, 10):<10} {_cut(r.frame_id, 17):<17} {r.status:<7}"
    if r.status == "ok":
        name = r.class_name if r.class_name is not None else str(r.label)
        total = r.latency_ms.get("total")
        tail = (f" {_cut(name, 10):<10} {r.confidence or 0:4.2f} exit {r.exit_index}"
                + (f" {total:.1f} ms" if total is not None else ""))
    else:
        tail = f" {r.error or ''}"
    return _cut(head + tail, WIDTH)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_watch(args: argparse.Namespace) -> int:
    settings = bus_settings(args)
    topics = Topics(args.prefix)
    wanted = statuses(args.status)
    if args.count < 0:
        raise OfframpError(f"--count {args.count}: a number of results, 0 for no end")
    if args.view:
        asyncio.run(show_live(settings, LiveView(), client_id=f"offramp-watch-{os.getpid()}",
                              connect_timeout_s=args.connect_timeout))
        return 0
    topic = topics.results_all() if args.source == "+" else topics.results(args.source)
    all_statuses = wanted == frozenset(STATUSES)

    def out(results: Iterable[Result], raw: bytes) -> int:
        """Write what passes the filter; return how many frames it answered."""
        chosen = [r for r in results if r.status in wanted]
        if not chosen:
            return 0
        if args.lines:
            sys.stdout.write("".join(line(r) + "\n" for r in chosen))
        elif all_statuses:  # as it came: a result, or a refusal of many frames
            sys.stdout.write(raw.decode(errors="replace") + "\n")
        else:
            sys.stdout.write("".join(json.dumps(_fields(r)) + "\n" for r in chosen))
        sys.stdout.flush()
        return len(chosen)

    async def go() -> None:
        async with Bus(settings, f"offramp-watch-{os.getpid()}") as bus:
            await bus.wait_connected(args.connect_timeout)
            sub = await bus.subscribe(topic, qos=1, maxsize=100_000)
            n = 0
            async for msg in sub:
                try:
                    results = read_results(msg.payload)
                except WireError as exc:
                    print(f"offramp watch: not a result on {msg.topic}: {exc}", file=sys.stderr)
                    continue
                n += out(results, msg.payload)
                if args.count and n >= args.count:
                    return

    asyncio.run(go())
    return 0


def _fields(r: Result) -> dict[str, object]:
    return {name: getattr(r, name) for name in r.__dataclass_fields__}
