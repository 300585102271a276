"""A bus client with a will, for the will test: connects, says it is ready, then waits to die."""

import asyncio
import sys

from offramp.bus import Bus, Topics, Will
from offramp.settings import BusSettings
from offramp.wire import Heartbeat


async def main(url: str, prefix: str, node: str) -> None:
    topics = Topics(prefix)
    state = topics.state("worker", node)
    will = Will(state, Heartbeat(role="worker", node=node, online=False).encode())
    async with Bus(BusSettings(broker_url=url, topic_prefix=prefix), f"will-{node}",
                   will=will) as bus:
        await bus.wait_connected(10)
        await bus.publish(state, Heartbeat(role="worker", node=node, online=True).encode(), qos=1,
                          retain=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
