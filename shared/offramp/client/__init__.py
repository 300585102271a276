"""offramp's Python client (README, "A Python client"): send frames, get their answers, follow
the rate the system takes them at."""

from offramp.client.api import Client, encode_frame
from offramp.client.blocking import BlockingClient
from offramp.client.pace import PaceFollower, follow_pace

__all__ = ["BlockingClient", "Client", "PaceFollower", "encode_frame", "follow_pace"]
