"""The MQTT bus: a supervised connection with bounded, routed inboxes and decoding
subscriptions, the topic scheme, an in-memory bus with the same interface for tests, and the
read path (whose module ``paho_internals`` is the one place that touches paho-mqtt and aiomqtt
internals)."""

from offramp.bus.connection import Bus
from offramp.bus.memory import MemoryBroker, MemoryBus
from offramp.bus.subscription import (
    BusStats,
    Message,
    MessageBus,
    Subscription,
    Will,
    from_payload,
    raw,
)
from offramp.bus.topics import ParsedTopic, Topics, check_name

__all__ = ["Bus", "BusStats", "MemoryBroker", "MemoryBus", "Message", "MessageBus",
           "ParsedTopic", "Subscription", "Topics", "Will", "check_name", "from_payload", "raw"]
