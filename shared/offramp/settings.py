"""Settings: frozen dataclasses read from ``OFFRAMP_*`` environment variables, validated at start.

Each field is declared with :func:`setting`, which carries its documentation and its bounds, so
that the variable name, the default, the check and the docs live in one place. A service's
settings class nests :class:`CommonSettings` (variables ``OFFRAMP_*``) and adds its own fields
under its own prefix (for example ``OFFRAMP_WORKER_*``). ``offramp settings`` prints them all.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import unquote, urlsplit

from offramp.errors import SettingsError

T = TypeVar("T")

PREFIX = "OFFRAMP_"


def setting(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    env: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare one setting: default, one-line documentation and optional numeric bounds."""
    meta = {"doc": doc, "min": min, "max": max, "env": env, "secret": secret}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults")
    return field(default=default, metadata=meta)


def nested(cls: type[Any], prefix: str) -> Any:
    """A nested settings group read under its own variable prefix."""
    return field(default_factory=cls, metadata={"prefix": prefix})


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the MQTT broker is, parsed from ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, *, variable: str = "broker url") -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise SettingsError(
                f"{variable}={url!r}: expected mqtt://host:port or mqtts://host:port"
            )
        if not parts.hostname:
            raise SettingsError(f"{variable}={url!r}: no host name")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise SettingsError(f"{variable}={url!r}: bad port ({exc})") from None
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, tls, user, password)

    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = f"{self.username}@" if self.username else ""
        return f"{scheme}://{auth}{self.host}:{self.port}"


@dataclass(frozen=True)
class BusSettings:
    """How a service talks to the broker (variables ``OFFRAMP_*``)."""

    broker_url: str = setting(
        "", "Broker URL, mqtt://[user:pass@]host:port or mqtts://...; empty: start a private broker"
    )
    username: str = setting("", "Broker user name (overrides the one in the URL)")
    password: str = setting("", "Broker password (overrides the one in the URL)", secret=True)
    password_file: str = setting("", "File holding the broker password, read at each connect "
                                 "(overrides OFFRAMP_PASSWORD; for Secrets mounted as files)")
    tls_ca: str = setting("", "CA certificate file for mqtts:// (empty: system CAs)")
    topic_prefix: str = setting("offramp/v1", "Prefix of every topic offramp uses")
    keepalive_s: int = setting(15, "MQTT keepalive in seconds", min=2, max=3600)
    session_expiry_s: int = setting(
        30, "MQTT v5 session expiry: QoS 1 messages wait this long for a client that "
        "reconnects (broker restart, network blip); 0 = clean sessions", min=0, max=86400,
    )
    inbound_queue: int = setting(1024, "Default bound of each subscription's inbound queue",
                                 min=1, max=1_000_000)
    reconnect_min_s: float = setting(0.1, "First reconnect delay (doubles, jittered)",
                                     min=0.001, max=60)
    reconnect_max_s: float = setting(5.0, "Largest reconnect delay", min=0.01, max=600)
    publish_timeout_s: float = setting(
        10.0, "How long a publish waits for a connection before it fails", min=0.0, max=3600
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024, "Largest message accepted or sent", min=1024, max=256 * 1024 * 1024
    )
    bus_read_path: Literal["fast", "library"] = setting(
        "fast", "How messages are read and written: fast (the mqtt5 codec on large socket "
        "reads; queued packets joined into one send) or library (paho-mqtt's and aiomqtt's own "
        "paths, slower, for a paho or aiomqtt release whose internals the fast paths do not "
        "know)")

    def __post_init__(self) -> None:
        if self.password_file:
            self._read_password()

    def _read_password(self) -> str:
        try:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SettingsError(f"OFFRAMP_PASSWORD_FILE={self.password_file!r}: cannot read "
                                f"it ({e.__class__.__name__}: {e})") from None

    def address(self) -> BrokerAddress:
        if not self.broker_url:
            raise SettingsError("OFFRAMP_BROKER_URL is empty and no local broker was started")
        addr = BrokerAddress.parse(self.broker_url, variable="OFFRAMP_BROKER_URL")
        if self.username:
            addr = dataclasses.replace(addr, username=self.username)
        password = self._read_password() if self.password_file else self.password
        if password:
            addr = dataclasses.replace(addr, password=password)
        return addr


@dataclass(frozen=True)
class TraceSettings:
    """OpenTelemetry traces (variables ``OFFRAMP_TRACE_*``)."""

    sample: float = setting(0.0, "Share of frames traced, decided where a frame arrives (0: "
                            "tracing off). Set it on every service: a worker records the "
                            "spans of traced frames when it is above 0", min=0.0, max=1.0)
    exporter: Literal["otlp", "file"] = setting(
        "otlp", "otlp: OTLP over HTTP, to OTEL_EXPORTER_OTLP_ENDPOINT (default "
        "http://localhost:4318); file: one JSON object per span, appended to OFFRAMP_TRACE_FILE")
    file: str = setting("", "The file exporter's file; {node} in it becomes the node name "
                        "(one file per service)")
    queue: int = setting(8192, "Spans held for export; beyond it new spans are dropped (and "
                         "counted by OpenTelemetry's processor)", min=64, max=1_000_000)

    def __post_init__(self) -> None:
        if self.sample <= 0:
            return
        if (importlib.util.find_spec("opentelemetry") is None
                or importlib.util.find_spec("opentelemetry.sdk") is None):
            raise SettingsError("OFFRAMP_TRACE_SAMPLE > 0 needs OpenTelemetry: pip install "
                                "'offramp[tracing]' (the service images have it)")
        if self.exporter == "file" and not self.file:
            raise SettingsError("OFFRAMP_TRACE_EXPORTER=file needs OFFRAMP_TRACE_FILE")


@dataclass(frozen=True)
class CommonSettings:
    """Settings every service has (variables ``OFFRAMP_*``)."""

    node: str = setting("", "Node name, unique per process; empty: host name")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: Literal["auto", "json", "console"] = setting(
        "auto", "auto (JSON unless on a TTY), json or console"
    )
    heartbeat_s: float = setting(0.25, "Heartbeat period in seconds", min=0.01, max=60)
    heartbeat_gap_ms: float = setting(20.0, "Shortest gap between heartbeats; one is sent early "
                                      "when a queue has room for a waiting sender", min=1,
                                      max=60_000)
    http_port: int = setting(0, "Port of /livez, /readyz and /metrics (0: no HTTP server)",
                             min=0, max=65535)
    http_host: str = setting("0.0.0.0", "Address the HTTP server listens on")
    max_pixels: int = setting(0, "Largest image accepted, in pixels, read from its header "
                              "before any decoding, at admission and at the first worker (0: "
                              "4K UHD, or 4x the model input if larger)", min=0, max=1 << 28)
    lifeline_fd: int = setting(-1, "Read end of a pipe held open by whatever started this "
                               "service; end of file stops it cleanly (set by offramp up; "
                               "-1: none)", min=-1)
    bus: BusSettings = nested(BusSettings, PREFIX)
    trace: TraceSettings = nested(TraceSettings, "OFFRAMP_TRACE_")

    def node_name(self) -> str:
        return self.node or socket.gethostname()


S = TypeVar("S")


def load(cls: type[S], prefix: str = PREFIX, env: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from environment variables named ``prefix + FIELD``; raise SettingsError."""
    source = os.environ if env is None else env
    return _load(cls, prefix, source)


def _load(cls: type[S], prefix: str, env: Mapping[str, str]) -> S:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if "prefix" in f.metadata:
            values[f.name] = _load(hint, f.metadata["prefix"], env)
            continue
        name = f.metadata.get("env") or prefix + f.name.upper()
        value = _parse(name, env[name], hint) if name in env else f.default
        _check(name, value, f.metadata)
        values[f.name] = value
    try:
        return cls(**values)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{cls.__name__}: {exc}") from None


def _parse(name: str, raw: str, hint: Any) -> Any:
    origin = get_origin(hint)
    raw = raw.strip()
    if origin is Literal:
        choices = get_args(hint)
        if raw not in choices:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(map(str, choices))}")
        return raw
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(hint) if a is not type(None)]
        if raw == "" or raw.lower() == "none":
            return None
        return _parse(name, raw, args[0])
    if origin is tuple:
        (item, *_rest) = get_args(hint)
        return tuple(_parse(name, part, item) for part in raw.split(",") if part.strip())
    if hint is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    if hint is int or hint is float:
        try:
            return hint(raw)
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise SettingsError(f"{name}={raw!r}: expected {kind}") from None
    if hint is str:
        return raw
    raise SettingsError(f"{name}: unsupported setting type {hint!r}")


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if lo is not None and item < lo:
            raise SettingsError(f"{name}={item!r}: must be >= {lo}")
        if hi is not None and item > hi:
            raise SettingsError(f"{name}={item!r}: must be <= {hi}")


def describe(cls: type[Any], prefix: str = PREFIX) -> Iterator[tuple[str, str, str]]:
    """Yield (variable, default, doc) for every setting of ``cls``, nested groups included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "prefix" in f.metadata:
            yield from describe(hints[f.name], f.metadata["prefix"])
            continue
        name = f.metadata.get("env") or prefix + f.name.upper()
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        yield name, shown, f.metadata.get("doc", "")
