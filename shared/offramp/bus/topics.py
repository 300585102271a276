"""Every MQTT topic offramp uses, built and parsed in one place (docs/wire.md, Topics).

Services never write a topic string by hand: they ask a :class:`Topics` for it, and parse what
they receive with :meth:`Topics.parse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from offramp.errors import TopicError

TopicKind = Literal["ingest", "results", "act", "done", "state", "plan", "exit-policy", "source",
                    "pace"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ROLES = ("admission", "worker", "arbiter", "scheduler", "client")


def check_name(value: str, what: str = "name") -> str:
    """A topic level must be a plain name: letters, digits, '.', '_' and '-'; no wildcards."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise TopicError(
            f"{what} {value!r} is not a valid topic level "
            "(1-128 of letters, digits, '.', '_', '-', starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a received topic names. Fields that the kind does not have are empty strings."""

    kind: TopicKind
    source: str = ""
    model: str = ""
    segment: int = 0
    node: str = ""
    role: str = ""


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses offramp topics under one prefix (default ``offramp/v1``)."""

    prefix: str = "offramp/v1"

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not self.prefix or any(not lv or lv in ("+", "#") for lv in levels):
            raise TopicError(f"topic prefix {self.prefix!r} must be non-empty levels without wildcards")

    # -- builders ---------------------------------------------------------------------------
    def ingest(self, source: str) -> str:
        return f"{self.prefix}/ingest/{check_name(source, 'source')}"

    def results(self, source: str) -> str:
        return f"{self.prefix}/results/{check_name(source, 'source')}"

    def replies(self, source: str, client: str) -> str:
        """A client's own response topic for frames of ``source`` (MQTT v5 request/response;
        the broker's ACL lets a camera read ``replies/<its source>/#``)."""
        return f"{self.prefix}/replies/{check_name(source, 'source')}/{check_name(client, 'client')}"

    def done(self, source: str) -> str:
        """Completions reported by workers to the admission-controller that owns the frame."""
        return f"{self.prefix}/done/{check_name(source, 'source')}"

    def act(self, model: str, segment: int, node: str | None = None) -> str:
        base = f"{self.prefix}/act/{check_name(model, 'model')}/{_segment(segment)}"
        return base if node is None else f"{base}/{check_name(node, 'node')}"

    def state(self, role: str, node: str) -> str:
        if role not in ROLES:
            raise TopicError(f"role {role!r} is not one of {', '.join(ROLES)}")
        return f"{self.prefix}/state/{role}/{check_name(node, 'node')}"

    def plan(self) -> str:
        return f"{self.prefix}/control/plan"

    def exit_policy(self, model: str) -> str:
        return f"{self.prefix}/control/exit-policy/{check_name(model, 'model')}"

    def source(self, source: str) -> str:
        """Retained per-source registration (priority, rate, deadline)."""
        return f"{self.prefix}/control/source/{check_name(source, 'source')}"

    def pace(self, source: str) -> str:
        """Retained per-source pace: the rate the admission-controller takes its frames at."""
        return f"{self.prefix}/control/pace/{check_name(source, 'source')}"

    # -- subscription filters ---------------------------------------------------------------
    def ingest_all(self) -> str:
        return f"{self.prefix}/ingest/+"

    def results_all(self) -> str:
        return f"{self.prefix}/results/+"

    def done_all(self) -> str:
        return f"{self.prefix}/done/+"

    def state_all(self, role: str = "+") -> str:
        return f"{self.prefix}/state/{role}/+"

    def exit_policy_all(self) -> str:
        return f"{self.prefix}/control/exit-policy/+"

    def pace_all(self) -> str:
        return f"{self.prefix}/control/pace/+"

    def source_all(self) -> str:
        return f"{self.prefix}/control/source/+"

    @staticmethod
    def shared(group: str, topic_filter: str) -> str:
        """An MQTT v5 shared subscription: one member of ``group`` gets each message."""
        return f"$share/{check_name(group, 'share group')}/{topic_filter}"

    # -- parser -----------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Name what ``topic`` is, or raise TopicError if offramp did not build it."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        levels = topic[len(head):].split("/")
        match levels:
            case ["ingest", source]:
                return ParsedTopic("ingest", source=check_name(source, "source"))
            case ["results", source]:
                return ParsedTopic("results", source=check_name(source, "source"))
            case ["done", source]:
                return ParsedTopic("done", source=check_name(source, "source"))
            case ["act", model, seg, *rest] if len(rest) <= 1:
                node = check_name(rest[0], "node") if rest else ""
                return ParsedTopic("act", model=check_name(model, "model"),
                                   segment=_parse_segment(seg), node=node)
            case ["state", role, node] if role in ROLES:
                return ParsedTopic("state", role=role, node=check_name(node, "node"))
            case ["control", "plan"]:
                return ParsedTopic("plan")
            case ["control", "exit-policy", model]:
                return ParsedTopic("exit-policy", model=check_name(model, "model"))
            case ["control", "source", source]:
                return ParsedTopic("source", source=check_name(source, "source"))
            case ["control", "pace", source]:
                return ParsedTopic("pace", source=check_name(source, "source"))
        raise TopicError(f"topic {topic!r} is not an offramp topic")


def _segment(segment: int) -> str:
    if isinstance(segment, bool) or not isinstance(segment, int) or not 1 <= segment <= 999:
        raise TopicError(f"segment {segment!r} must be an integer 1..999")
    return str(segment)


def _parse_segment(level: str) -> int:
    if not level.isdigit():
        raise TopicError(f"segment level {level!r} is not a number")
    return int(_segment(int(level)))
