"""What every ``offramp`` subcommand's arguments share: help that shows defaults and choices,
and argument types that say what is wrong."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from offramp.settings import BusSettings


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's help ends with its default, written as it would
    be typed (``2,4,8``, not a Python tuple). An option that is off or empty by default says
    in its own help what its absence means, so no ``(default: None)`` follows it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default in ("", ()) \
                or action.nargs == 0 or "%(default)" in help_text:  # a flag says it itself
            return help_text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            default = action.default
            if isinstance(default, tuple | list):
                default = ",".join(str(v) for v in default)
            if default is not argparse.SUPPRESS:
                return f"{help_text} (default: {str(default).replace('%', '%%')})"
        return help_text


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


# argparse has no public way to walk a parser's arguments and subcommands; these two are the
# only places that read its private attributes.
def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """``parser``'s arguments and options, ``--help`` and its subcommands' action included."""
    return list(parser._actions)  # noqa: SLF001


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``parser``'s subcommands: name -> (its parser, the help it is listed with)."""
    out: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    for action in arguments(parser):
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            listed = {a.dest: a.help or "" for a in action._choices_actions}  # noqa: SLF001
            out.update({name: (sub, listed.get(name, "")) for name, sub in action.choices.items()})
    return out


def apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every subcommand's parser the :class:`HelpFormatter`."""
    parser.formatter_class = HelpFormatter
    for sub, _ in subcommands(parser).values():
        apply_formatter(sub)


def add_bus_options(p: argparse.ArgumentParser) -> None:
    """``--broker`` and ``--prefix``, for the commands that talk to a running system."""
    p.add_argument("--broker", default="", help="mqtt://host:port, mqtts://host:port, or "
                   "host[:port] for plain MQTT (empty: OFFRAMP_BROKER_URL)")
    p.add_argument("--prefix", default="offramp/v1", help="topic prefix")


def bus_settings(args: argparse.Namespace) -> BusSettings:
    """The bus of ``--broker`` (or ``OFFRAMP_BROKER_URL``), with ``--prefix``."""
    from offramp.errors import SettingsError
    from offramp.settings import BrokerAddress, BusSettings

    given, variable = (args.broker, "--broker") if args.broker else (
        os.environ.get("OFFRAMP_BROKER_URL", ""), "OFFRAMP_BROKER_URL")
    if not given:
        raise SettingsError("no broker: pass --broker mqtt://host:port or set OFFRAMP_BROKER_URL "
                            "(offramp up prints its URL)")
    url = given if "://" in given else f"mqtt://{given}"  # host[:port]: plain MQTT
    BrokerAddress.parse(url, variable=variable)  # a bad one is named as the user gave it
    return BusSettings(broker_url=url, topic_prefix=args.prefix)
