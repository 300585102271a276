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
    create,
    existing,
    netns_exec,
    parse_rate,
    remove,
)

PORT = 1883


def _up(args: argparse.Namespace) -> int:
    from offramp.local.broker import LocalBroker
    from offramp.local.launcher import ProcessGroup, interrupt_on_stop_signals
    from offramp.local.system import split_segments
    from offramp.model.bundle import load_bundle

    interrupt_on_stop_signals()
    bundle = load_bundle(args.bundle)
    plan = Plan(args.name, args.workers, parse_rate(args.link), args.subnet)
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix=f"offramp-netbed-{plan.name}-"))
    logdir.mkdir(parents=True, exist_ok=True)
    create(plan)
    gw = netns_exec(plan.gateway.namespace)
    broker = LocalBroker(PORT, host=plan.broker_address, wrap=gw, persistence=True,
                         workdir=logdir)
    group: ProcessGroup | None = None
    try:
        broker.start()
        root = str(bundle.root.resolve())
        group = ProcessGroup(logdir, {
            "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": args.prefix,
            "OFFRAMP_LOG_FORMAT": "json", "OFFRAMP_ADMISSION_BUNDLE": root,
            "OFFRAMP_WORKER_BUNDLE": root, "OFFRAMP_ARBITER_BUNDLE": root,
            "OFFRAMP_SCHEDULER_BUNDLE": root})
        group.add("exit-arbiter", "arbiter-1", wrap=gw)
        group.add("priority-scheduler", "scheduler-1", wrap=gw)
        segments = split_segments([s.flops for s in bundle.manifest.segments], plan.workers)
        for node, segs in zip(plan.worker_nodes, segments, strict=True):
            group.add("segment-worker", node.name,
                      {"OFFRAMP_WORKER_SEGMENTS": ",".join(map(str, segs))},
                      wrap=netns_exec(node.namespace))
        group.add("admission-controller", "admission-1", wrap=gw)
        print(f"netbed {plan.name}: broker {broker.url}, {plan.workers} workers, every link "
              f"{plan.mbps:g} Mbit/s each way; logs in {logdir}")
        print(f"publish from this host: offramp publish --broker {broker.url} --prefix "
              f"{args.prefix}; Ctrl-C stops it", flush=True)
        while all(m.alive for m in group.members) and broker.running:
            time.sleep(0.5)
        dead = [m.node for m in group.members if not m.alive]
        print(f"netbed {plan.name}: stopped because {', '.join(dead) or 'the broker'} exited")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if group is not None:
            group.stop()
        broker.close()
        remove(plan.name)


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
