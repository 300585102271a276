"""Every frame gets its answer through crashes and stalls: a standby admission-controller takes
the ingest session over, a silent worker's later hops are dispatched again at once, and a
camera that asks with MQTT v5 request/response gets its answer where it asked, matched."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import Counter

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_system import LATER_HOPS_ENV, _frames, _run, later_hop_workers

from offramp.bus import Bus
from offramp.local.client import envelope, png_bytes
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle


def test_a_standby_takes_over_when_the_admission_controller_is_killed_mid_stream(
        tiny_bundle: Bundle, prefix: str) -> None:
    """SIGKILL of the active admission-controller at 150 frames/s; no operator action. Every
    frame is answered; a frame answered twice (answered, not yet acknowledged when it died)
    carries its own frame id both times; no task id names two frames."""
    _, payloads = _frames(450)
    env = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "1.5", "OFFRAMP_RECONNECT_MAX_S": "0.5"}
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, standby=True) as system:
        active = system.member("admission-1")

        async def kill_active(bus: Bus) -> None:
            await asyncio.sleep(1.0)
            active.signal(signal.SIGKILL)

        results = asyncio.run(_run(system, payloads, rate=150, during=kill_active, timeout=60))
        logs = system.logs(tail=4000)
        system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == len(payloads), logs
    assert Counter(r.status for r in results)["ok"] >= len(payloads)
    frames_of_task: dict[str, set[str]] = {}
    for r in results:
        frames_of_task.setdefault(r.task_id, set()).add(r.frame_id)
    assert all(len(f) == 1 for f in frames_of_task.values())
    assert {r.task_id.split("-")[1] for r in results} >= {"1", "2"}  # both answered some
    assert '"ingest_session_taken"' in logs


def test_a_silent_worker_holding_later_hops_has_its_work_sent_again_at_once(
        tiny_bundle: Bundle, prefix: str) -> None:
    """worker-2 runs segment 1 and passes the rest on to worker-1 (or, slower, worker-3).
    worker-1 is stopped (SIGSTOP) mid-stream: its heartbeat goes silent, and the frames it
    holds, which it was not the first hop of, are dispatched again within a second instead of
    waiting out the 5 s progress timeout. Resumed, its late completions are duplicates."""
    _, payloads = _frames(300)
    with LocalSystem(tiny_bundle, 0, prefix=prefix, env=LATER_HOPS_ENV) as system:
        later_hop_workers(system)
        stalled = system.member("worker-1")

        async def stall(bus: Bus) -> None:
            await asyncio.sleep(1.0)
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
