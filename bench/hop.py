"""``make bench-hop``: one bus hop of an activation packet vs two bare paho-mqtt clients.

A hop is: encode the packet, hand it to the bus, broker, receive, decode to a numpy array.
Measured as a ping-pong (each side decodes and re-encodes), halved, so that one clock times
both directions. The baseline is the same number of bytes ping-ponged between two bare paho
clients (network threads, no encoding), halved, against the same broker in the same run.
Throughput: 64 KiB packets per second one way, offramp (encode + publish, receive + decode)
vs bare paho, both QoS 0, counted at the receiver. Every figure is the median over three
baseline/offramp pairs run back to back. The bus is measured on both read paths:
``fast`` (mqtt5 on large reads, the default; the top-level figures) and ``library``
(``OFFRAMP_BUS_READ_PATH=library``: paho's and aiomqtt's own).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt

from bench.common import Conditions, percentile_ms, write_result
from offramp.bus import Bus, Topics
from offramp.local.broker import LocalBroker
from offramp.settings import BusSettings
from offramp.wire import ActivationPacket, Sample, Tensor

SIZES = {"16KiB": 16 * 1024, "64KiB": 64 * 1024, "256KiB": 256 * 1024, "1MiB": 1024 * 1024}
ROUNDS = 300
WARMUP = 30
THROUGHPUT_N = 3000
PAIRS = 3
ReadPath = Literal["fast", "library"]


def _packet(nbytes: int) -> ActivationPacket:
    arr = np.random.default_rng(0).standard_normal((1, nbytes // 4)).astype(np.float32)
    return ActivationPacket(model="bench", segment=2,
                            samples=(Sample(task_id="task-0", source="cam-0", frame_id="frame-0"),),
                            tensor=Tensor.encode(arr))


async def offramp_pingpong(url: str, nbytes: int, read_path: ReadPath) -> list[float]:
    settings = BusSettings(broker_url=url, topic_prefix="bench", bus_read_path=read_path)
    t = Topics("bench")
    ping, pong = t.act("bench", 2, "a"), t.act("bench", 2, "b")
    packet = _packet(nbytes)
    async with Bus(settings, "hop-a") as a, Bus(settings, "hop-b") as b:
        sub_a = await a.subscribe(pong)
        sub_b = await b.subscribe(ping)
        await asyncio.gather(a.wait_connected(5), b.wait_connected(5))

        async def echo() -> None:
            while True:
                msg = await sub_b.get()
                got = ActivationPacket.decode(msg.payload)
                got.tensor.to_numpy()
                await b.publish(pong, got.encode())

        task = asyncio.create_task(echo())
        times = []
        for i in range(WARMUP + ROUNDS):
            t0 = time.perf_counter()
            await a.publish(ping, packet.encode())
            back = ActivationPacket.decode((await sub_a.get()).payload)
            back.tensor.to_numpy()
            if i >= WARMUP:
                times.append((time.perf_counter() - t0) / 2)
        task.cancel()
    return times


def paho_pingpong(port: int, nbytes: int) -> list[float]:
    payload = b"x" * nbytes
    got = threading.Event()
    a = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "base-a", protocol=mqtt.MQTTv5)
    b = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "base-b", protocol=mqtt.MQTTv5)
    a.on_message = lambda c, u, m: got.set()
    b.on_message = lambda c, u, m: b.publish("base/pong", m.payload)
    for c, topic in ((a, "base/pong"), (b, "base/ping")):
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(topic)
    time.sleep(0.5)
    times = []
    for i in range(WARMUP + ROUNDS):
        got.clear()
        t0 = time.perf_counter()
        a.publish("base/ping", payload)
        if not got.wait(5):
            raise RuntimeError("baseline ping-pong lost a message")
        if i >= WARMUP:
            times.append((time.perf_counter() - t0) / 2)
    for c in (a, b):
        c.loop_stop()
        c.disconnect()
    return times


def offramp_throughput(url: str, nbytes: int, read_path: ReadPath) -> float:
    """Sender and receiver each run their own event loop in their own thread, as two services
    would (and as the two paho clients of the baseline each have their network thread)."""
    settings = BusSettings(broker_url=url, topic_prefix="bench", inbound_queue=THROUGHPUT_N,
                           bus_read_path=read_path)
    topic = Topics("bench").act("bench", 2, "tp")
    packet = _packet(nbytes)
    ready, done = threading.Event(), threading.Event()
    finished: dict[str, float] = {}

    async def receive() -> None:
        async with Bus(settings, "tp-rx") as rx:
            sub = await rx.subscribe(topic)
            await rx.wait_connected(5)
            ready.set()
            received = 0
            try:
                async with asyncio.timeout(30):
                    while received < THROUGHPUT_N:
                        ActivationPacket.decode((await sub.get()).payload).tensor.to_numpy()
                        received += 1
            except TimeoutError:
                pass
            finished.update(count=received, at=time.perf_counter())
            done.set()

    async def send() -> float:
        async with Bus(settings, "tp-tx") as tx:
            await tx.wait_connected(5)
            ready.wait(10)
            t0 = time.perf_counter()
            for i in range(THROUGHPUT_N):
                await tx.publish(topic, packet.encode())
                if i % 16 == 0:
                    await asyncio.sleep(0)  # let the writer drain, as a service's loop would
            await asyncio.to_thread(done.wait, 60)
            return t0

    rx_thread = threading.Thread(target=asyncio.run, args=(receive(),))
    rx_thread.start()
    t0 = asyncio.run(send())
    rx_thread.join()
    return finished["count"] / (finished["at"] - t0)


def paho_throughput(port: int, nbytes: int) -> float:
    payload = b"x" * nbytes
    count = 0
    done = threading.Event()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= THROUGHPUT_N:
            done.set()

    tx = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "tp-base-tx", protocol=mqtt.MQTTv5)
    rx = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "tp-base-rx", protocol=mqtt.MQTTv5)
    rx.on_message = on_message
    for c in (tx, rx):
        c.connect("127.0.0.1", port)
        c.loop_start()
    rx.subscribe("base/tp")
    time.sleep(0.5)
    t0 = time.perf_counter()
    for _ in range(THROUGHPUT_N):
        tx.publish("base/tp", payload)
    done.wait(30)
    elapsed = time.perf_counter() - t0
    for c in (tx, rx):
        c.loop_stop()
        c.disconnect()
    return count / elapsed


def _median(values: list[float]) -> float:
    return float(np.median(values))


def main() -> None:
    """Each figure is the median of PAIRS runs, each offramp run timed right after its own
    bare-paho baseline (baseline, fast, library, baseline, fast, ...): this machine's speed
    drifts over seconds, and one pair at a time keeps the drift out of the ratios."""
    conditions = Conditions.now()
    out: dict[ReadPath, dict[str, Any]] = {"fast": {"sizes": {}}, "library": {"sizes": {}}}
    with LocalBroker() as broker:
        for name, nbytes in SIZES.items():
            runs: dict[str, list[list[float]]] = {"base": [], "fast": [], "library": []}
            for _ in range(PAIRS):
                runs["base"].append(paho_pingpong(broker.port, nbytes))
                for path in ("fast", "library"):
                    runs[path].append(asyncio.run(offramp_pingpong(broker.url, nbytes, path)))
            base_p50 = [percentile_ms(b, 50) for b in runs["base"]]
            for path in ("fast", "library"):
                p50 = [percentile_ms(r, 50) for r in runs[path]]
                out[path]["sizes"][name] = {
                    "offramp_p50_ms": round(_median(p50), 4),
                    "offramp_p99_ms": round(_median([percentile_ms(r, 99) for r in runs[path]]), 4),
                    "baseline_p50_ms": round(_median(base_p50), 4),
                    "baseline_p99_ms": round(_median([percentile_ms(b, 99) for b in runs["base"]]), 4),
                    "ratio_p50": round(_median([o / b for o, b in zip(p50, base_p50, strict=True)]), 3),
                }
                print(path, name, out[path]["sizes"][name], flush=True)
        tp: dict[str, list[float]] = {"base": [], "fast": [], "library": []}
        for _ in range(PAIRS):
            tp["base"].append(paho_throughput(broker.port, SIZES["64KiB"]))
            for path in ("fast", "library"):
                tp[path].append(offramp_throughput(broker.url, SIZES["64KiB"], path))
    for path in ("fast", "library"):
        out[path]["throughput_64KiB"] = {"offramp_msgs_per_s": round(_median(tp[path]), 1),
                                         "baseline_msgs_per_s": round(_median(tp["base"]), 1)}
        out[path]["throughput_ratio"] = round(_median(
            [o / b for o, b in zip(tp[path], tp["base"], strict=True)]), 3)
        out[path]["ratio_p50_64KiB"] = out[path]["sizes"]["64KiB"]["ratio_p50"]
    write_result("hop", {"rounds": ROUNDS, "pairs": PAIRS, **out["fast"],
                         "library_read_path": out["library"],
                         "goals": {"ratio_p50_at_64KiB": "<= 1.1", "throughput_ratio": ">= 0.75"}},
                 conditions)


if __name__ == "__main__":
    main()
