"""``offramp testbed``: emulated Jetson nodes as containers, through the Docker Engine API
(:mod:`offramp.local.testbed`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from offramp.local import testbed
from offramp.local.testbed import (
    DEFAULT_NAME,
    PROFILES,
    Testbed,
    TestbedSpec,
    parse_nodes,
    render_status,
    wait_until_serving,
)


def _testbed(args: argparse.Namespace) -> int:
    bed = Testbed.connect(args.engine or None)
    if args.action == "status":  # every testbed unless --name
        print("\n".join(render_status(bed.status(args.name))))
        return 0
    name = args.name or DEFAULT_NAME
    if args.action == "down":
        print(f"testbed {name}: removed {bed.down(name)} containers")
        return 0
    spec = TestbedSpec(name, parse_nodes(args.nodes), args.bundle,
                       image_prefix=args.image_prefix, image_tag=args.tag,
                       broker_image=args.broker_image, network=args.network, port=args.port,
                       prefix=args.prefix)
    plan = bed.up(spec)
    for c in plan:
        limits = f"{c.nano_cpus / 1e9:g} CPU, {c.mem_limit}" if c.nano_cpus else "no limits"
        print(f"  {c.name:<28} {c.role:<22} {limits}")
    took = wait_until_serving(spec.broker_url, spec.prefix, len(spec.nodes), args.wait)
    print(f"testbed {spec.name} serving after {took:.0f} s; broker {spec.broker_url}\n"
          f"  offramp publish --broker {spec.broker_url} --rate 50\n"
          f"  offramp watch --broker {spec.broker_url}\n"
          f"  offramp testbed down --name {spec.name}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "\n".join(f"  {p.name:<10} {f'{p.cpus:g} CPU':<8} {p.memory:<4} {p.about}"
                      for p in PROFILES.values())
    p = sub.add_parser("testbed", help="emulated Jetson nodes as containers (Docker Engine API)",
                       description=(testbed.__doc__ or "").split("\n\nThe planning part")[0]
                       + f"\n\nprofiles:\n{about}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down", "status"), help="start, remove or show")
    p.add_argument("--name", default=DEFAULT_NAME, help="testbed name (containers' label)")
    p.add_argument("--nodes", default="nano,xavier-nx,orin-nano",
                   help=f"profile[:count],... of {', '.join(PROFILES)}")
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="model bundle")
    p.add_argument("--engine", default="", help="engine URL (empty: DOCKER_HOST)")
    p.add_argument("--network", choices=("bridge", "host"), default="bridge",
                   help="host: every container on the host's network (hosts without "
                        "container networking)")
    p.add_argument("--port", type=int, default=1883, help="broker port on 127.0.0.1")
    p.add_argument("--image-prefix", default="offramp/", help="images: <prefix><service>:<tag>")
    p.add_argument("--tag", default="latest", help="image tag")
    p.add_argument("--broker-image", default="eclipse-mosquitto:2", help="the broker's image")
    p.add_argument("--prefix", default="offramp/v1", help="topic prefix")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the workers")
    p.set_defaults(handler=_testbed)
