"""``offramp up`` (and the registration of ``publish`` and ``watch``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from offramp.bus import Topics
from offramp.cli.args import positive
from offramp.cli.live import LiveView, show_live
from offramp.cli.publish import register as register_publish
from offramp.cli.watch import register as register_watch
from offramp.local.broker import free_port
from offramp.local.launcher import interrupt_on_stop_signals
from offramp.local.system import LocalSystem
from offramp.model.bundle import load_bundle
from offramp.settings import BusSettings


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

    register_publish(sub)
    register_watch(sub)


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
        settings = BusSettings(broker_url=broker.url, topic_prefix=args.prefix)
        asyncio.run(show_live(settings, view, client_id=f"offramp-up-{os.getpid()}",
                              exited=system.exited))
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
