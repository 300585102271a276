"""The MQTT bus: a supervised connection with bounded, routed inboxes, the topic scheme, and
the read path (the one place that touches paho-mqtt and aiomqtt internals)."""
