"""offramp: model-distributed inference with early exits across edge nodes, over MQTT.

The library (folder ``shared/offramp``) holds what every service shares, in layers that import
only downwards: ``errors`` and ``settings``; ``wire`` (the msgpack format) and ``policy`` (pure
decisions); ``bus`` (MQTT) and ``model`` (bundles, ONNX sessions, inputs); ``node`` (the
service runtime); ``ml`` (training and export, the ``train`` extra); ``local`` (running it on
one machine) and ``cli`` (the ``offramp`` command). Each service is a package of its own
(``services/<name>/<name_with_underscores>``) that depends on this one.
"""

from offramp.errors import (
    BrokerError,
    BusError,
    OfframpError,
    RefusedError,
    SettingsError,
    TopicError,
    WireError,
)

__version__ = "0.2.0"

__all__ = [
    "BrokerError", "BusError", "OfframpError", "RefusedError", "SettingsError", "TopicError", "WireError",
    "__version__",
]
