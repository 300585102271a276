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

from offramp.cli.args import apply_formatter, positive, subcommands
from offramp.errors import OfframpError
from offramp.node.log import configure_logging

Handler = Callable[[argparse.Namespace], int]


def _broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from offramp.local.broker import LocalBroker

    stop = threading.Event()  # SIGTERM (docker stop, kill) ends it as Ctrl-C does: cleaned up
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalBroker(args.port) as broker:
        print(f"mosquitto listening: {broker.url}  (config {broker.config_path}); Ctrl-C stops it",
              flush=True)
        try:
            while broker.running and not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def _settings(args: argparse.Namespace) -> int:
    from offramp.local.services import service_specs
    from offramp.settings import describe

    specs = service_specs()
    if args.service and args.service not in specs:
        raise OfframpError(f"no service {args.service!r}; one of {', '.join(specs)}")
    for service, spec in specs.items():
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


def _register_ml(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 command: str | None) -> None:
    """The training commands. Their options need the ``train`` extra (torch, seconds to
    import), so only the command that runs gets them; the others are listed by name and
    purpose. Without the extra, a training command explains how to get it."""
    from offramp.ml.commands import COMMANDS

    if command not in COMMANDS:
        for name, helptext in COMMANDS.items():
            sub.add_parser(name, help=helptext)
        return
    try:
        from offramp.cli.onnx_import import register as register_import
        from offramp.cli.train import register
    except ImportError as exc:
        missing = exc.name or "torch"

        def unavailable(args: argparse.Namespace) -> int:
            print(f"offramp {args.command}: needs the training extra ({missing} is missing): "
                  "pip install 'offramp[train]'", file=sys.stderr)
            return 2

        for name, helptext in COMMANDS.items():
            sub.add_parser(name, help=f"{helptext} (needs the train extra)").set_defaults(
                handler=unavailable)
        return
    register(sub)
    register_import(sub)


LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``command``: the subcommand that will run (None: any), which
    alone gets the training commands' options."""
    from offramp import __version__

    parser = argparse.ArgumentParser(prog="offramp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"offramp {__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="what the command itself logs, on stderr (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a private Mosquitto on 127.0.0.1 in the foreground")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.set_defaults(handler=_broker)

    p = sub.add_parser("settings", help="list every OFFRAMP_* setting with default and meaning")
    p.add_argument("service", nargs="?", default=None, help="one service's settings only (None: "
                   "every installed service's)")
    p.set_defaults(handler=_settings)

    _register_ml(sub, command)

    p = sub.add_parser("demo", help="build the demo model if needed, run the system on the "
                                     "digits test split, print a summary")
    p.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="model bundle (the "
                   "demo preset is built there when missing)")
    p.add_argument("--workers", type=positive, default=2, help="segment-workers")
    p.add_argument("--rate", type=float, default=150.0, help="frames per second")
    p.set_defaults(handler=_demo)

    from offramp.cli.netbed import register as register_netbed
    from offramp.cli.run import register as register_commands
    from offramp.cli.testbed import register as register_testbed

    register_commands(sub)
    register_testbed(sub)
    register_netbed(sub)
    for subparser in sub.choices.values():  # --log-level after the command's name, too
        subparser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                               help="what the command itself logs, on stderr")
    for described, listed in subcommands(parser).values():  # `offramp X --help` says what X does
        described.description = described.description or listed
    apply_formatter(parser)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``, before parsing (None: none)."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Log lines go to stderr, so that stdout carries only what a command is for (``offramp
    watch > results.jsonl``); a reader that goes away (``| head``) ends the command quietly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command(argv)).parse_args(argv)
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
