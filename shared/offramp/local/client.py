"""Client side of offramp: publish frames to an ingest topic, collect results.

Used by ``offramp publish``/``watch``, the demo, the tests and the benchmarks; any MQTT client
can do the same (see the README).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from offramp.bus import Message, MessageBus, Subscription, Topics, from_payload
from offramp.bus.outbox import Outbox
from offramp.client.pace import PaceFollower
from offramp.errors import BusError, WireError
from offramp.wire import FrameEnvelope, Heartbeat, Plan, Result, Tensor, read_results


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def envelope(frame_id: str, *, image: np.ndarray | None = None, tensor: np.ndarray | None = None,
             label: int | None = None, deadline_s: float | None = None) -> bytes:
    """A msgpack frame envelope around a PNG image (uint8 HxWx3) or a model-input tensor."""
    now = time.time()
    return FrameEnvelope(frame_id=frame_id, ts=now, image=png_bytes(image) if image is not None else None,
                         tensor=Tensor.encode(tensor) if tensor is not None else None,
                         deadline=now + deadline_s if deadline_s else None, label=label).encode()


@dataclass(frozen=True)
class Outgoing:
    """One frame as a camera sends it: the payload and, for a bare image, its frame id as MQTT
    v5 correlation data (an envelope carries its own)."""

    payload: bytes
    correlation: bytes | None = None


async def publish_frames(bus: MessageBus, topic: str,
                         payloads: Iterable[bytes | Outgoing], rate: float, qos: int = 1,
                         window: int = 32, pace: PaceFollower | None = None) -> float:
    """Publish at ``rate`` frames per second (0: as fast as possible); return seconds taken.
    ``payloads`` is read one frame at a time, when that frame is due, so a generator can stamp
    each frame (its time, its deadline) as it is sent. Up to ``window`` QoS 1 publishes wait for
    their acknowledgement at once, as a camera's MQTT client keeps several in flight (paho:
    20); one at a time would cap the rate at one frame per broker round trip. With ``pace``
    (the source's, :func:`offramp.client.follow_pace`), each frame also waits until it fits
    the pace: a list of images is sent at the lower of the two rates, none left out (a live
    camera skips frames instead: :mod:`offramp.local.video`). Raises the first BusError once
    every publish has ended."""
    failed: list[BusError] = []

    async def one(frame: Outgoing) -> None:
        try:
            await bus.publish(topic, frame.payload, qos=qos, correlation_data=frame.correlation)
        except BusError as exc:
            failed.append(exc)

    start = time.perf_counter()
    frames = iter(payloads)
    async with Outbox(window, grace_s=None) as outbox:
        for i in itertools.count():
            if rate > 0:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if pace is not None:
                await pace.wait()
            frame = next(frames, None)
            if frame is None:
                break
            await outbox.send(one(frame if isinstance(frame, Outgoing) else Outgoing(frame)))
    if failed:
        raise failed[0]
    return time.perf_counter() - start


@dataclass
class Collected:
    results: list[Result] = field(default_factory=list)
    bad: int = 0
    first: float = 0.0
    last: float = 0.0
    sent_again: int = 0  # frames published again for want of an answer (:func:`answered`)


async def collect(sub: Subscription[Message], count: int, timeout: float) -> Collected:
    """Read results until ``count`` arrived or ``timeout`` seconds pass without completing."""
    out = Collected()
    deadline = time.monotonic() + timeout
    while len(out.results) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msg = await asyncio.wait_for(sub.get(), remaining)
        except TimeoutError:
            break
        try:
            out.results.extend(read_results(msg.payload))  # a refusal: one per frame
        except WireError:
            out.bad += 1
            continue
        now = time.perf_counter()
        out.first = out.first or now
        out.last = now
    return out


async def answered(bus: MessageBus, topic: str, frames: dict[str, bytes | Outgoing],
                   sub: Subscription[Message], *, wait_s: float, again: int = 3,
                   got: Collected | None = None) -> Collected:
    """Read answers to ``frames`` (frame id -> what was published for it) from ``sub``; a
    frame with none after ``wait_s`` is published again under the same id, up to ``again``
    times. What a camera does so that a broker crash loses nothing: the admission-controller
    answers a frame sent again with the answer it gave it, or serves it if it never arrived
    (docs/wire.md, "Sending a frame again"). Answers already read go in ``got``."""
    out = got or Collected()
    for attempt in range(again + 1):
        seen = {r.frame_id for r in out.results}
        missing = [f for f in frames if f not in seen]
        if not missing:
            break
        if attempt:
            await publish_frames(bus, topic, [frames[f] for f in missing], 0)
            out.sent_again += len(missing)
        more = await collect(sub, len(missing), wait_s)
        out.results += more.results
        out.bad += more.bad
        out.first = out.first or more.first
        out.last = more.last or out.last
    return out


async def wait_for_plan(bus: MessageBus, topics: Topics, timeout: float) -> Plan:
    """Wait until the workers host what the scheduler's plan in force gives them (a plan
    arrives a second or so after start, and loading its segments takes a while): what a
    measurement of the steady state waits for. Returns that plan."""
    plans = await bus.subscribe(topics.plan(), maxsize=16, decode=from_payload(Plan.decode))
    states = await bus.subscribe(topics.state_all("worker"), maxsize=1024,
                                 decode=from_payload(Heartbeat.decode))
    latest: list[Plan] = []
    hosted: dict[str, set[int]] = {}

    async def read_plans() -> None:
        async for plan in plans:
            latest.append(plan)

    async def read_states() -> None:
        async for hb in states:
            if hb.online:
                hosted[hb.node] = {s.segment for s in hb.segments}

    def taken_up() -> bool:
        return bool(latest) and all(hosted.get(node) == {r.segment for r in refs}
                                    for node, refs in latest[-1].nodes.items())

    readers = [asyncio.create_task(read_plans()), asyncio.create_task(read_states())]
    try:
        deadline = time.monotonic() + timeout
        while not taken_up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not take up the plan within {timeout} s "
                                   f"(plan: {latest[-1].nodes if latest else None}, "
                                   f"hosted: {hosted})")
            await asyncio.sleep(0.05)
        return latest[-1]
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await plans.close()
        await states.close()


async def wait_for_workers(bus: MessageBus, topics: Topics, nodes: int, timeout: float) -> None:
    """Wait until ``nodes`` workers serve and an admission-controller holds the ingest session
    (the system is up: a frame sent now is taken)."""
    sub = await bus.subscribe(topics.state_all(), maxsize=1024, decode=from_payload(Heartbeat.decode))
    seen: set[str] = set()
    admission = False
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < nodes or not admission:
            hb = await asyncio.wait_for(sub.get(), max(0.01, deadline - time.monotonic()))
            if hb.role == "worker" and hb.online and hb.segments:
                seen.add(hb.node)
            elif hb.role == "admission" and hb.online and hb.active_since > 0:
                admission = True
    finally:
        await sub.close()
