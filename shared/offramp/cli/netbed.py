"""The ``offramp netbed`` command: the rehearsal network of :mod:`offramp.local.netbed` with the
whole system running in it."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from offramp.cli.args import positive
from offramp.local.netbed import (
    DEFAULT_NAME,
    DEFAULT_SUBNET,
    PROFILES,
    Plan,
    existing,
    netns_exec,
    parse_rate,
    remove,
)


def _up(args: argparse.Namespace) -> int:
    from offramp.local.launcher import interrupt_on_stop_signals
    from offramp.local.netbed_run import running
    from offramp.model.bundle import load_bundle

    interrupt_on_stop_signals()
    bundle = load_bundle(args.bundle)
    plan = Plan(args.name, args.workers, parse_rate(args.link), args.subnet)
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix=f"offramp-netbed-{plan.name}-"))
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        with running(plan, bundle, logdir, prefix=args.prefix) as system:
            print(f"netbed {plan.name}: broker {system.broker.url}, {plan.workers} workers, every "
                  f"link {plan.mbps:g} Mbit/s each way; logs in {logdir}")
            print(f"publish from this host: offramp publish --broker {system.broker.url} "
                  f"--prefix {args.prefix}; Ctrl-C stops it", flush=True)
            while all(m.alive for m in system.group.members) and system.broker.running:
                time.sleep(0.5)
            dead = [m.node for m in system.group.members if not m.alive]
            print(f"netbed {plan.name}: stopped because {', '.join(dead) or 'the broker'} "
                  "exited")
            return 1
    except KeyboardInterrupt:
        return 0


def _down(args: argparse.Namespace) -> int:
    removed = remove(args.name)
    print(f"netbed {args.name}: removed {', '.join(removed) or 'nothing (none found)'}")
    return 0


def _status(args: argparse.Namespace) -> int:
    namespaces = existing(args.name)
    if not namespaces:
        print(f"netbed {args.name}: none")
        return 0
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              check=False).stdout.split()
        qdisc = subprocess.run([*netns_exec(ns), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True, check=False).stdout.strip()
        rate = qdisc.split(" rate ")[1].split()[0] if " rate " in qdisc else "-"
        print(f"{ns:<16} processes {len(pids):<3} egress {rate}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("netbed", help="the system on a shaped rehearsal network (network "
                       "namespaces, veth, tbf; needs root)")
    p.add_argument("action", choices=("up", "down", "status"),
                   help="up: build the network and run the system in it until Ctrl-C; down: "
                        "remove it (also after up was killed); status: what exists")
    p.add_argument("--name", default=DEFAULT_NAME, help="netbed name: its namespaces are "
                   "<name>-hub, <name>-gw, <name>-w1...")
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="model bundle")
    p.add_argument("--workers", type=positive, default=3, help="segment-workers, one "
                   "namespace each")
    p.add_argument("--link", default="wifi", help=f"every link's rate each way: "
                   f"{', '.join(f'{k} ({v:g} Mbit/s)' for k, v in PROFILES.items())} or Mbit/s")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets of the /24; "
                   "the broker is .1, workers .11 up, this host .254")
    p.add_argument("--prefix", default="offramp/v1", help="topic prefix")
    p.add_argument("--logdir", default=None, help="service logs (None: a new temporary folder)")
    p.set_defaults(handler=lambda args: {"up": _up, "down": _down, "status": _status}[
        args.action](args))
