"""The source registry (PA-MDI's sources): each camera's priority weight, optional deadline
per frame and expected rate. The admission-controller and the priority-scheduler both read it,
from a TOML file and from retained JSON messages on ``control/source/{source}``.

File (``OFFRAMP_SOURCES_FILE``)::

    [sources.cam-gate]
    priority = 4.0        # gamma_m > 0, larger is more important
    deadline_ms = 200     # optional: answer 'expired' after this long
    rate_hz = 30          # optional: expected frames per second (for the plan)

Message (any MQTT client): ``mosquitto_pub -r -t offramp/v1/control/source/cam-gate -m
'{"priority": 4, "deadline_ms": 200}'``; an empty retained message removes the entry.
A message overrides the file for that source.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from offramp.bus import Message, Topics, check_name
from offramp.errors import SettingsError, TopicError, WireError
from offramp.settings import setting


@dataclass(frozen=True)
class SourceSettings:
    """Where sources come from and what happens to unknown ones (variables OFFRAMP_SOURCES_*)."""

    file: str = setting("", "TOML file of sources (priority, deadline_ms, rate_hz); empty: none")
    unknown: Literal["default", "reject"] = setting(
        "default", "A source in no registry: 'default' serves it at the default priority, "
        "'reject' answers its frames 'error'")
    default_priority: float = setting(1.0, "Priority of a source in no registry", min=1e-6,
                                      max=1e6)
    default_rate_hz: float = setting(10.0, "Expected rate of a source that gives none (plan)",
                                     min=0, max=1e6)


@dataclass(frozen=True)
class SourceSpec:
    source: str
    priority: float = 1.0
    deadline_s: float | None = None
    rate_hz: float | None = None

    @classmethod
    def parse(cls, source: str, data: Any, where: str) -> SourceSpec:
        """Validate one entry (a dict from TOML or JSON); raise ValueError naming ``where``."""
        check_name(source, "source")
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a table of priority, deadline_ms, rate_hz")
        unknown = set(data) - {"priority", "deadline_ms", "rate_hz"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")

        def number(key: str, default: float | None) -> float | None:
            value = data.get(key, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{where}.{key}: expected a number > 0, got {value!r}")
            return float(value)

        deadline = number("deadline_ms", None)
        return cls(source, number("priority", 1.0) or 1.0,
                   None if deadline is None else deadline / 1000, number("rate_hz", None))

    def to_json(self) -> bytes:
        body: dict[str, float] = {"priority": self.priority}
        if self.deadline_s is not None:
            body["deadline_ms"] = self.deadline_s * 1000
        if self.rate_hz is not None:
            body["rate_hz"] = self.rate_hz
        return json.dumps(body).encode()


@dataclass(frozen=True)
class Registration:
    """One retained message on ``control/source/{source}``: the spec, or None to remove it."""

    source: str
    spec: SourceSpec | None


def parse_registration(source: str, payload: bytes) -> Registration:
    """The registration ``payload`` makes for ``source``; WireError saying why it is not one."""
    if not payload:
        return Registration(source, None)
    try:
        spec = SourceSpec.parse(source, json.loads(payload), f"control/source/{source}")
    except (ValueError, TopicError) as exc:  # JSON errors are ValueErrors too
        raise WireError(f"source registration for {source!r}: {exc}") from None
    return Registration(source, spec)


def registration(topics: Topics) -> Callable[[Message], Registration]:
    """A subscription decoder for ``control/source/+`` (the source comes from the topic)."""
    return lambda msg: parse_registration(topics.parse(msg.topic).source, msg.payload)


class SourceRegistry:
    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self._file = load_file(settings.file) if settings.file else {}
        self._messages: dict[str, SourceSpec] = {}

    def update(self, source: str, payload: bytes) -> SourceSpec | None:
        """Apply a retained registration; an empty payload removes it. Raises WireError."""
        return self.apply(parse_registration(source, payload))

    def apply(self, reg: Registration) -> SourceSpec | None:
        if reg.spec is None:
            self._messages.pop(reg.source, None)
        else:
            self._messages[reg.source] = reg.spec
        return reg.spec

    def lookup(self, source: str) -> SourceSpec | None:
        """The source's entry; for an unknown source the default one, or None ('reject')."""
        spec = self._messages.get(source) or self._file.get(source)
        if spec is None and self.settings.unknown == "default":
            spec = SourceSpec(source, self.settings.default_priority)
        return spec

    def known(self) -> dict[str, SourceSpec]:
        return {**self._file, **self._messages}

    def expected_rate(self, source: str) -> float:
        spec = self.lookup(source)
        rate = spec.rate_hz if spec is not None else None
        return rate if rate is not None else self.settings.default_rate_hz


def load_file(path: str) -> dict[str, SourceSpec]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SettingsError(f"OFFRAMP_SOURCES_FILE={path!r}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"OFFRAMP_SOURCES_FILE={path!r}: {exc}") from None
    table = data.get("sources", {})
    if set(data) - {"sources"} or not isinstance(table, dict):
        raise SettingsError(f"OFFRAMP_SOURCES_FILE={path!r}: expected only [sources.<name>] tables")
    out = {}
    for name, entry in table.items():
        try:
            out[name] = SourceSpec.parse(name, entry, f"{path}: sources.{name}")
        except (ValueError, TopicError) as exc:
            raise SettingsError(f"OFFRAMP_SOURCES_FILE: {exc}") from None
    return out

