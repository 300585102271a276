"""The broker's own figures (Mosquitto's ``$SYS`` topics), exported as metrics: what the
broker drops or holds is invisible to the services otherwise.

Mosquitto queues QoS 1 messages for a client that is slow or away, up to
``max_queued_messages`` / ``max_queued_bytes`` per client, and drops beyond that (and QoS 0
messages for an offline client). ``$SYS/broker/publish/messages/dropped`` counts those drops;
the store figures say how much it holds now. It publishes them every ``sys_interval``.
"""

from __future__ import annotations

import contextlib

from offramp.bus import Message
from offramp.node.metrics import Reading

SYS_TOPICS = "$SYS/broker/#"
FIGURES = {  # $SYS topic -> (metric, kind, help)
    "$SYS/broker/publish/messages/dropped": (
        "offramp_broker_messages_dropped_total", "counter",
        "Messages the broker dropped (queue limits reached, or QoS 0 to an offline client)"),
    "$SYS/broker/store/messages/count": (
        "offramp_broker_stored_messages", "gauge", "Messages the broker holds now"),
    "$SYS/broker/store/messages/bytes": (
        "offramp_broker_stored_bytes", "gauge", "Payload bytes the broker holds now"),
    "$SYS/broker/clients/connected": (
        "offramp_broker_clients_connected", "gauge", "Clients connected to the broker"),
}


class BrokerFigures:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def observe(self, msg: Message) -> None:
        """A ``$SYS`` message; figures offramp does not export, or cannot read, are ignored."""
        if msg.topic in FIGURES:
            with contextlib.suppress(ValueError, IndexError):
                self.values[msg.topic] = float(msg.payload.split()[0])

    def read(self, r: Reading) -> None:
        for topic, value in self.values.items():
            name, kind, doc = FIGURES[topic]
            if kind == "counter":
                r.counter(name, doc, value)
            else:
                r.gauge(name, doc, value)
