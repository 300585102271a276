"""Every frame gets its answer through crashes and stalls: a standby admission-controller takes
the ingest session over, a silent worker's later hops are dispatched again at once, and a
camera that asks with MQTT v5 request/response gets its answer where it asked, matched."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_system import LATER_HOPS_ENV, _frames, _run, later_hop_workers

from offramp.bus import Bus, Message, Subscription, Topics
from offramp.local.client import envelope, png_bytes
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire import Result, read_results

pytestmark = pytest.mark.tier("broker")


def test_a_standby_takes_over_when_the_admission_controller_is_killed_mid_stream(
        tiny_bundle: Bundle, prefix: str) -> None:
    """SIGKILL of the active admission-controller at 300 frames/s; no operator action. Every
    frame is answered once: the frames it answered and had not acknowledged when it died come
    to the standby, which saw those answers and does not answer them again. No task id names
    two frames."""
    _, payloads = _frames(900)
    env = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "1.5", "OFFRAMP_RECONNECT_MAX_S": "0.5"}
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, standby=True) as system:
        active = system.member("admission-1")

        async def kill_active(bus: Bus) -> None:
            await asyncio.sleep(1.0)
            active.signal(signal.SIGKILL)

        results = asyncio.run(_run(system, payloads, rate=300, during=kill_active, timeout=60))
        logs = system.logs(tail=4000)
        system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == len(payloads), logs
    assert set(per_frame.values()) == {1}, [f for f, n in per_frame.items() if n > 1]
    assert Counter(r.status for r in results) == {"ok": len(payloads)}
    frames_of_task: dict[str, set[str]] = {}
    for r in results:
        frames_of_task.setdefault(r.task_id, set()).add(r.frame_id)
    assert all(len(f) == 1 for f in frames_of_task.values())
    assert {r.task_id.split("-")[1] for r in results} >= {"1", "2"}  # both answered some
    assert '"ingest_session_taken"' in logs


@pytest.mark.exclusive
def test_a_silent_worker_holding_later_hops_has_its_work_sent_again_at_once(
        tiny_bundle: Bundle, prefix: str) -> None:
    """worker-2 runs segment 1 and passes the rest on to worker-1 (or, slower, worker-3).
    worker-1 is stopped (SIGSTOP) mid-stream, as soon as work is sent to it: its heartbeat
    goes silent, and the frames it holds, which it was not the first hop of, are dispatched
    again within a second instead of waiting out the 5 s progress timeout. Resumed, its late
    completions are duplicates."""
    _, payloads = _frames(300)
    with LocalSystem(tiny_bundle, 0, prefix=prefix, env=LATER_HOPS_ENV) as system:
        later_hop_workers(system)
        stalled = system.member("worker-1")

        async def stall(bus: Bus) -> None:
            # stopped once work is on its way to it (under load it may join the flow late)
            to_it = await bus.subscribe(Topics(prefix).act(system.bundle.name, 2, "worker-1"))
            await asyncio.wait_for(to_it.get(), 20)
            stalled.signal(signal.SIGSTOP)
            await asyncio.sleep(2.5)
            stalled.signal(signal.SIGCONT)

        results = asyncio.run(_run(system, payloads, rate=150, during=stall))
        logs = system.logs(tail=4000)
        system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == len(payloads) and set(per_frame.values()) == {1}
    assert Counter(r.status for r in results) == {"ok": len(payloads)}
    slowest = max(r.latency_ms["total"] for r in results)
    assert slowest < 2500, (slowest, logs)
    assert '"silent"' in logs  # the admission-controller sent worker-1's frames again


def test_a_frame_sent_with_a_response_topic_is_answered_there_with_its_correlation_data(
        tiny_bundle: Bundle, prefix: str) -> None:
    """A bare paho client publishes a PNG (no envelope, no frame id) with MQTT v5 Response
    Topic and Correlation Data: the result comes on that topic with the correlation data
    echoed, and its frame id is the correlation data, so the file sent and the answer match."""
    images, _ = _frames(3)
    with LocalSystem(tiny_bundle, 1, prefix=prefix) as system:
        asyncio.run(_run(system, [envelope("warm-up", image=images[0])]))  # the system is up
        got: list[tuple[bytes, dict[str, object]]] = []
        arrived = threading.Event()
        reply = f"{prefix}/replies/cam-1/job-9"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "bare-camera",
                             protocol=mqtt.MQTTv5)

        def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            correlation = getattr(msg.properties, "CorrelationData", b"")
            got.append((correlation, json.loads(msg.payload)))
            if len(got) == 2:
                arrived.set()

        client.on_message = on_message
        address = system.url.removeprefix("mqtt://").split(":")
        client.connect(address[0], int(address[1]))
        client.loop_start()
        try:
            client.subscribe(reply, qos=1)
            for i, tag in enumerate((b"img-0042.png", b"\x00\xffbinary")):
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = reply
                props.CorrelationData = tag
                client.publish(f"{prefix}/ingest/cam-1", png_bytes(images[i + 1]), qos=1,
                               properties=props).wait_for_publish(5)
            assert arrived.wait(30), got
        finally:
            client.loop_stop()
            client.disconnect()
            system.stop()
    by_tag = dict(got)
    assert by_tag[b"img-0042.png"]["frame_id"] == "img-0042.png"
    assert by_tag[b"img-0042.png"]["status"] == "ok"
    assert by_tag[b"\x00\xffbinary"]["frame_id"] == b"\x00\xffbinary".hex()


def test_frames_whose_deadline_passes_are_answered_and_acknowledged(tiny_bundle: Bundle,
                                                                    prefix: str) -> None:
    """A frame answered 'expired' is acknowledged like any other: with an ingest window of 4,
    expired frames left unacknowledged would stop the broker after the fourth."""
    images, _ = _frames(40)
    payloads = [envelope(f"late-{i}", image=im, deadline_s=0.001) for i, im in enumerate(images)]
    env = {"OFFRAMP_ADMISSION_INGEST_WINDOW": "4", "OFFRAMP_ADMISSION_INGEST_QUEUE": "8"}
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=env) as system:
        results = asyncio.run(_run(system, payloads, rate=100, timeout=20))
        system.stop()
    assert Counter(r.frame_id for r in results) == {f"late-{i}": 1 for i in range(40)}
    assert Counter(r.status for r in results)["expired"] >= 30, Counter(r.status for r in results)


class _BareCamera:
    """A plain paho MQTT v5 client, as a camera runs it, keeping what comes on its replies."""

    def __init__(self, url: str, name: str, inflight: int) -> None:
        self.replies: list[tuple[bytes | None, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, name, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(inflight)
        self.client.on_message = self._on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.replies.append((getattr(msg.properties, "CorrelationData", None), msg.payload))

    def send(self, topic: str, payload: bytes, frame_id: str, reply: str | None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = frame_id.encode()
        if reply is not None:
            props.ResponseTopic = reply
        self.client.publish(topic, payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _outcomes(sub: Subscription[Message], n: int) -> tuple[list[Result], int]:
    """At least ``n`` per-frame outcomes and what came within a second after (a second
    answer to some frame would), with the number of messages they came in."""
    got: list[Result] = []
    messages = 0
    async with asyncio.timeout(60):
        while len(got) < n:
            got.extend(read_results((await sub.get()).payload))
            messages += 1
    await asyncio.sleep(1.0)
    while (late := sub.get_nowait()) is not None:
        got.extend(read_results(late.payload))
        messages += 1
    return got, messages


def test_a_burst_beyond_the_in_flight_bound_is_refused_in_few_messages_each_frame_once(
        tiny_bundle: Bundle, prefix: str) -> None:
    """A bare paho camera sends 400 PNG frames at once (QoS 1, each frame id as correlation
    data, every other one with a response topic) to a system that keeps 8 frames of a source
    in flight. Every frame gets exactly one outcome on results/cam-1, ok or listed in a
    refusal; the refusals come as a few messages, not one per frame; and each frame that asked
    for its answer on the response topic finds it there too."""
    images, _ = _frames(40)
    n, reply = 400, f"{prefix}/replies/cam-1"
    env = {"OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "8"}
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=env) as system:
        asyncio.run(_run(system, [envelope("warm-up", image=images[0])]))  # the system is up
        camera = _BareCamera(system.url, "bursting-camera", inflight=n)

        async def burst() -> tuple[list[Result], int]:
            async with Bus(BusSettings(broker_url=system.url), f"watcher-{prefix[-6:]}") as bus:
                await bus.wait_connected(10)
                sub = await bus.subscribe(f"{prefix}/results/cam-1", qos=1, maxsize=10_000)
                camera.client.subscribe(reply, qos=1)
                await asyncio.sleep(0.3)
                for i in range(n):
                    camera.send(f"{prefix}/ingest/cam-1", png_bytes(images[i % 40]), f"b{i}",
                                reply if i % 2 else None)
                return await _outcomes(sub, n)

        try:
            results, messages = asyncio.run(burst())
            time.sleep(0.5)
        finally:
            camera.close()
            logs = system.logs(tail=3000)
            system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert set(per_frame) == {f"b{i}" for i in range(n)} and set(per_frame.values()) == {1}
    status = Counter(r.status for r in results)
    assert set(status) == {"ok", "dropped"} and status["dropped"] >= n // 2, (status, logs)
    assert messages - status["ok"] < status["dropped"] / 10, (messages, status)
    on_reply: Counter[str] = Counter()
    for correlation, payload in camera.replies:
        for r in read_results(payload):
            on_reply[r.frame_id] += 1
            assert r.status != "ok" or correlation == r.frame_id.encode()
    assert set(on_reply) == {f"b{i}" for i in range(1, n, 2)}
    assert set(on_reply.values()) == {1}
