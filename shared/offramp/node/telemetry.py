"""What a part of a service reports through: its logger, the service's metrics registry and its
tracing (which may be off). One object, so that a part takes the three together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from offramp.node.metrics import Metrics
from offramp.node.tracing import Tracing


@dataclass(frozen=True)
class Telemetry:
    log: Any  # a structlog logger, bound to the service's node
    metrics: Metrics
    tracing: Tracing | None = None
