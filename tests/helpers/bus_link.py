"""Publish BYTES over the bus to URL, as fast as the link takes them, feeding a LinkMeter with
the bus connection's TCP counters every 0.1 s; print the bytes not yet delivered (paho's
queue, the socket's unsent and unacknowledged bytes) just after publishing and once all is
acknowledged, then the meter's rate (bytes/s) last.

    bus_link.py URL BYTES
"""

from __future__ import annotations

import asyncio
import sys

from offramp.bus import Bus
from offramp.policy.links import LinkMeter
from offramp.settings import BusSettings

CHUNK = 128 * 1024


async def main(url: str, total: int) -> None:
    meter = LinkMeter()
    async with Bus(BusSettings(broker_url=url, topic_prefix="link-test"), "link-test") as bus:
        await bus.wait_connected(10)
        start = bus.tcp_info()
        assert start is not None, "no TCP counters for the bus's connection"
        meter.observe(start.bytes_acked, start.busy_us, start.rtt_us)
        chunks = max(1, total // CHUNK)
        for _ in range(chunks):
            await bus.publish("link-test/bulk", bytes(CHUNK))
        queued = bus.unsent_bytes()
        while (info := bus.tcp_info()) is not None and \
                info.bytes_acked - start.bytes_acked < chunks * CHUNK:
            meter.observe(info.bytes_acked, info.busy_us, info.rtt_us)
            print(f"acked {info.bytes_acked - start.bytes_acked} rate {meter.bytes_per_s:.0f}",
                  file=sys.stderr)
            await asyncio.sleep(0.1)
        print(f"unsent {queued} {bus.unsent_bytes()}")
    print(f"{meter.bytes_per_s:.0f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
