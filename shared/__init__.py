"""offramp: model-distributed inference with early exits across edge nodes, over MQTT.

The library (this package, folder ``shared/``) holds what every service shares: settings,
logging, topics, the wire format, the bus, the local broker and the launcher. Services live in
``offramp.services.*`` (folder ``services/``).
"""

from offramp.errors import (
    BrokerError,
    BusError,
    OfframpError,
    SettingsError,
    TopicError,
    WireError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError", "BusError", "OfframpError", "SettingsError", "TopicError", "WireError",
    "__version__",
]
