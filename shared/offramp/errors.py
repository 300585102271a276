"""The library's error types: one base class, one subclass per area, each message says what is wrong."""

from __future__ import annotations


class OfframpError(Exception):
    """Base class of every error offramp raises on purpose."""


class SettingsError(OfframpError):
    """A setting is missing, malformed or out of range; the message names the variable."""


class WireError(OfframpError):
    """Bytes that are not a valid offramp message; the message names the field at fault."""


class TopicError(OfframpError):
    """A topic that offramp did not build, or a name that cannot be part of a topic."""


class BrokerError(OfframpError):
    """The local Mosquitto broker could not be started or stopped."""


class BusError(OfframpError):
    """The MQTT bus is unavailable (not connected within the time allowed, or closed)."""


class RefusedError(BusError):
    """The broker refused a message (MQTT v5 failure reason: the ACL said no): sending it
    again will not help."""
