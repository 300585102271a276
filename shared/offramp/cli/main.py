"""offramp runs a deep network split into segments across edge devices, with early exits.
Cameras publish frames to MQTT; every frame gets one JSON result. Start with `offramp demo`
(everything on this machine, on a small model), or `offramp up` and `offramp publish`;
`offramp settings` lists every OFFRAMP_* variable the services read."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from offramp.cli.args import apply_formatter, positive
from offramp.errors import OfframpError
from offramp.node.log import configure_logging

Handler = Callable[[argparse.Namespace], int]


def _broker(args: argparse.Namespace) -> int:
    import time

    from offramp.local.broker import LocalBroker

    with LocalBroker(args.port) as broker:
        print(f"mosquitto listening: {broker.url}  (config {broker.config_path}); Ctrl-C stops it")
        try:
            while broker.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _settings(args: argparse.Namespace) -> int:
    from offramp.local.services import service_specs
    from offramp.settings import describe

    for service, spec in service_specs().items():
        if args.service and service != args.service:
            continue
        print(f"# {service}")
        for name, default, doc in describe(spec.settings, spec.prefix):
            print(f"{name:<40} {default!s:<14} {doc}")
        print()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from offramp.local.demo import run_demo

    return run_demo(args.bundle, args.workers, args.rate)


def _register_ml(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Training commands need the ``train`` extra; without torch they explain how to get it."""
    try:
        from offramp.ml.cli import register
    except ImportError as exc:
        missing = exc.name or "torch"

        def unavailable(args: argparse.Namespace) -> int:
            print(f"offramp {args.command}: needs the training extra ({missing} is missing): "
                  "pip install 'offramp[train]'", file=sys.stderr)
            return 2

        for name in ("build", "train", "export", "calibrate", "compress"):
            sub.add_parser(name, help="(needs the train extra)").set_defaults(handler=unavailable)
        return
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description=__doc__)
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning",
                                                                  "error"),
                        help="what the command itself logs, on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a private Mosquitto on 127.0.0.1 in the foreground")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.set_defaults(handler=_broker)

    p = sub.add_parser("settings", help="list every OFFRAMP_* setting with default and meaning")
    p.add_argument("service", nargs="?", default=None, help="one service's settings only (None: "
                   "every installed service's)")
    p.set_defaults(handler=_settings)

    _register_ml(sub)

    p = sub.add_parser("demo", help="build the demo model if needed, run the system on the "
                                     "digits test split, print a summary")
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="model bundle (the "
                   "demo preset is built there when missing)")
    p.add_argument("--workers", type=positive, default=2, help="segment-workers")
    p.add_argument("--rate", type=float, default=150.0, help="frames per second")
    p.set_defaults(handler=_demo)

    from offramp.cli.run import register as register_commands
    from offramp.local.netbed_cmd import register as register_netbed
    from offramp.local.testbed import register as register_testbed

    register_commands(sub)
    register_testbed(sub)
    register_netbed(sub)
    apply_formatter(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Log lines go to stderr, so that stdout carries only what a command is for (``offramp
    watch > results.jsonl``); a reader that goes away (``| head``) ends the command quietly."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "auto")
    handler: Handler = args.handler
    try:
        return handler(args)
    except OfframpError as exc:
        print(f"offramp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader is gone: no traceback, and no second error when Python flushes stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
