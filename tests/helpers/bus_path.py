"""Both ends of a path measurement over the bus, each run in its own network namespace.

    bus_path.py receive URL BYTES   subscribe; feed a PathMeter with what arrives from the
                                    sender until BYTES arrived; print its rate (bytes/s) last
    bus_path.py send URL BYTES      publish BYTES as activation packets, as fast as the bus
                                    takes them
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np

from offramp.bus import Bus
from offramp.policy.links import PathMeter
from offramp.settings import BusSettings
from offramp.wire import ActivationPacket, Sample, Tensor

TOPIC = "path-test/act"
CHUNK = 256 * 1024


async def receive(url: str, total: int) -> None:
    meter = PathMeter()
    async with Bus(BusSettings(broker_url=url, topic_prefix="path-test"), "path-rx") as bus:
        await bus.wait_connected(10)
        sub = await bus.subscribe(TOPIC, maxsize=10_000)
        print("subscribed", flush=True)
        got = 0
        while got < total:
            msg = await asyncio.wait_for(sub.get(), 60)
            packet = ActivationPacket.decode(msg.payload)
            meter.observe(packet.sender, len(msg.payload), packet.sent, msg.received)
            got += len(msg.payload)
    print(f"{meter.rates().get('sender', 0.0):.0f}")


async def send(url: str, total: int) -> None:
    x = np.zeros((1, CHUNK // 4), np.float32)
    async with Bus(BusSettings(broker_url=url, topic_prefix="path-test"), "path-tx") as bus:
        await bus.wait_connected(10)
        for i in range(total // CHUNK + 1):
            packet = ActivationPacket(model="m", segment=2, samples=(Sample(
                task_id=f"t{i}", source="s", frame_id=f"f{i}"),), tensor=Tensor.encode(x),
                sent=time.time(), sender="sender", sender_boot=1.0)
            await bus.publish(TOPIC, packet.encode())
        await asyncio.sleep(30)  # until the receiver has it all (it is killed then)


if __name__ == "__main__":
    role, url, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run((receive if role == "receive" else send)(url, nbytes))
