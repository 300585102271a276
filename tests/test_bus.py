"""The bus against a real Mosquitto: round trips, bounded inboxes, wills, restarts, sharing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from offramp.bus import Bus, Topics
from offramp.errors import BusError
from offramp.local.broker import LocalBroker
from offramp.settings import BusSettings
from offramp.wire import ActivationPacket, Heartbeat, Sample, Tensor

pytestmark = pytest.mark.tier("inproc")

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(params=["fast", "library"])
def bus_settings(bus_settings: BusSettings, request: pytest.FixtureRequest) -> BusSettings:
    """Every bus test runs on both read paths (OFFRAMP_BUS_READ_PATH)."""
    return replace(bus_settings, bus_read_path=request.param)


async def _next(sub: object, timeout: float = 5.0) -> object:
    return await asyncio.wait_for(sub.get(), timeout)  # type: ignore[attr-defined]


async def test_tensor_round_trip_over_the_broker(bus_settings: BusSettings, topics: Topics) -> None:
    arr = np.random.default_rng(0).standard_normal((4, 32, 8, 8)).astype(np.float32)
    samples = tuple(Sample(task_id=f"t{i}", source="cam", frame_id=f"f{i}") for i in range(4))
    packet = ActivationPacket(model="mnv2", segment=2, samples=samples, tensor=Tensor.encode(arr, "fp16"))
    async with Bus(bus_settings, "rx") as rx, Bus(bus_settings, "tx") as tx:
        sub = await rx.subscribe(topics.act("mnv2", 2, "n1"))
        await rx.wait_connected(5)
        await tx.publish(topics.act("mnv2", 2, "n1"), packet.encode())
        msg = await _next(sub)
        got = ActivationPacket.decode(msg.payload)  # type: ignore[attr-defined]
    assert got.samples == samples
    np.testing.assert_allclose(got.tensor.to_numpy(), arr, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("overflow", "kept"), [("drop-oldest", [15, 16, 17, 18, 19]),
                                                ("drop-newest", [0, 1, 2, 3, 4])])
async def test_full_inbox_drops_by_its_policy_and_counts_and_logs(
        bus_settings: BusSettings, topics: Topics, overflow: str, kept: list[int]) -> None:
    topic = topics.ingest("cam")
    with capture_logs() as logs:
        async with Bus(bus_settings, "rx") as rx, Bus(bus_settings, "tx") as tx:
            sub = await rx.subscribe(topic, maxsize=5, overflow=overflow, qos=1)  # type: ignore[arg-type]
            await rx.wait_connected(5)
            for i in range(20):
                await tx.publish(topic, str(i).encode(), qos=1)
            for _ in range(100):
                if rx.stats.received >= 20:
                    break
                await asyncio.sleep(0.02)
            got = [int(sub.inbox.get_nowait().payload) for _ in range(len(sub.inbox))]  # type: ignore[union-attr]
    assert got == kept
    assert sub.inbox.stats.dropped == 15
    assert sum(rx.stats.dropped.values()) == 15
    assert any(e["event"] == "inbox_overflow" for e in logs)


async def test_will_is_published_when_a_client_process_is_killed(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics, prefix: str) -> None:
    async with Bus(bus_settings, "watcher") as bus:
        sub = await bus.subscribe(topics.state_all("worker"))
        await bus.wait_connected(5)
        cmd = [sys.executable, str(HELPERS / "will_client.py"), broker.url, prefix, "doomed"]
        proc = subprocess.Popen(cmd)  # noqa: ASYNC220 - started once, reaped below
        try:
            hb = Heartbeat.decode((await _next(sub, 20)).payload)  # type: ignore[attr-defined]
            assert (hb.node, hb.online) == ("doomed", True)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            hb = Heartbeat.decode((await _next(sub, 20)).payload)  # type: ignore[attr-defined]
        finally:
            proc.kill()
    assert (hb.node, hb.online) == ("doomed", False)


async def test_client_survives_a_broker_restart_and_rereads_retained(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics) -> None:
    policy_topic = topics.exit_policy("mnv2")
    async with Bus(bus_settings, "pub") as pub, Bus(bus_settings, "sub") as rx:
        sub = await rx.subscribe(topics.ingest("cam"))
        control = await rx.subscribe(policy_topic)
        await asyncio.gather(pub.wait_connected(5), rx.wait_connected(5))
        await pub.publish(policy_topic, b"thresholds-v1", qos=1, retain=True)
        assert (await _next(control)).payload == b"thresholds-v1"  # type: ignore[attr-defined]
        await pub.publish(topics.ingest("cam"), b"before", qos=1)
        assert (await _next(sub)).payload == b"before"  # type: ignore[attr-defined]

        await asyncio.to_thread(broker.restart)
        await asyncio.sleep(0.2)
        await asyncio.gather(pub.wait_connected(10), rx.wait_connected(10))
        replay = await _next(control, 10)
        assert replay.payload == b"thresholds-v1" and replay.retain  # type: ignore[attr-defined]
        await pub.publish(topics.ingest("cam"), b"after", qos=1)
        assert (await _next(sub, 10)).payload == b"after"  # type: ignore[attr-defined]
    assert rx.stats.reconnects >= 1 and pub.stats.reconnects >= 1


async def test_publish_fails_clearly_when_no_broker_answers(bus_settings: BusSettings) -> None:
    dead = replace(bus_settings, broker_url="mqtt://127.0.0.1:9", publish_timeout_s=0.3)
    async with Bus(dead, "lonely") as bus:
        with pytest.raises(BusError, match=r"not connected to mqtt://127\.0\.0\.1:9"):
            await bus.publish("offramp-test/x", b"1")
        with pytest.raises(BusError, match="no connection"):
            await bus.wait_connected(0.2)


async def test_oversized_publish_is_refused(bus_settings: BusSettings) -> None:
    small = replace(bus_settings, max_message_bytes=1024)
    async with Bus(small, "big") as bus:
        with pytest.raises(BusError, match="over OFFRAMP_MAX_MESSAGE_BYTES"):
            await bus.publish("offramp-test/x", b"x" * 2048)


async def test_a_message_over_the_brokers_packet_limit_is_refused_naming_both_sizes(
        bus_settings: BusSettings, tmp_path: Path) -> None:
    """The broker says its maximum packet size in CONNACK; a bigger message is one BusError
    at the sender, not a disconnect and a silent loss. One just under it arrives."""
    with LocalBroker(max_packet_bytes=256 * 1024) as broker:
        settings = replace(bus_settings, broker_url=broker.url)
        async with Bus(settings, "sender") as bus, Bus(settings, "reader") as reader:
            await bus.wait_connected(5)
            await reader.wait_connected(5)
            assert bus.broker_max_packet == 256 * 1024
            sub = await reader.subscribe("offramp-test/big", qos=1)
            with pytest.raises(BusError, match=r"300000 bytes .* packet size of 262144"):
                await bus.publish("offramp-test/big", b"x" * 300_000, qos=1)
            await bus.publish("offramp-test/big", b"y" * 200_000, qos=1)
            msg = await _next(sub)
            assert len(msg.payload) == 200_000  # type: ignore[attr-defined]
            assert bus.connected.is_set()


async def test_shared_subscription_gives_each_message_to_one_member(
        bus_settings: BusSettings, topics: Topics) -> None:
    topic = topics.act("m", 1)
    async with (Bus(bus_settings, "w1") as w1, Bus(bus_settings, "w2") as w2,
                Bus(bus_settings, "tx") as tx):
        s1 = await w1.subscribe(topic, shared_group="workers", qos=1)
        s2 = await w2.subscribe(topic, shared_group="workers", qos=1)
        await asyncio.gather(w1.wait_connected(5), w2.wait_connected(5))
        for i in range(40):
            await tx.publish(topic, str(i).encode(), qos=1)
        for _ in range(100):
            if len(s1.inbox) + len(s2.inbox) >= 40:
                break
            await asyncio.sleep(0.02)
        a = {m.payload for m in s1.inbox.drain()}
        b = {m.payload for m in s2.inbox.drain()}
    assert len(a) + len(b) == 40 and not a & b
    assert a and b


async def test_unmatched_messages_are_counted(bus_settings: BusSettings, topics: Topics) -> None:
    async with Bus(bus_settings, "rx") as rx, Bus(bus_settings, "tx") as tx:
        sub = await rx.subscribe(topics.ingest("a"))
        await rx.wait_connected(5)
        await sub.close()
        await tx.publish(topics.ingest("a"), b"late", qos=1)
        await asyncio.sleep(0.2)
    assert rx.stats.received == 0 or rx.stats.unrouted >= 1


async def test_routes_follow_subscription_changes_and_stay_bounded(
        bus_settings: BusSettings, topics: Topics, monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic's subscription is remembered after its first message; subscribing or
    unsubscribing forgets every route, and no more than ROUTE_CACHE topics are remembered."""
    monkeypatch.setattr("offramp.bus.subscription.ROUTE_CACHE", 4)
    async with Bus(bus_settings, "rx") as rx, Bus(bus_settings, "tx") as tx:
        wide = await rx.subscribe(topics.ingest_all(), qos=1)
        await rx.wait_connected(5)
        for cam in ("a", "b", "c", "d", "e", "f"):
            await tx.publish(topics.ingest(cam), cam.encode(), qos=1)
        assert [(await _next(wide)).payload for _ in range(6)] == [  # type: ignore[attr-defined]
            b"a", b"b", b"c", b"d", b"e", b"f"]
        assert rx.router.cached_routes() <= 4
        await wide.close()
        narrow = await rx.subscribe(topics.ingest("a"), qos=1)
        await asyncio.sleep(0.2)
        await tx.publish(topics.ingest("a"), b"again", qos=1)
        assert (await _next(narrow)).payload == b"again"  # type: ignore[attr-defined]


async def test_qos1_publishes_across_a_broker_restart_neither_fail_nor_wedge_the_bus(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics) -> None:
    """A publish pending when the connection drops is retried on the next connection at once,
    and the bus stays usable (it once waited out aiomqtt's timeout, then marked itself
    disconnected while connected, and every later publish failed)."""
    topic = topics.ingest("cam")
    async with Bus(bus_settings, "steady") as pub:
        await pub.wait_connected(5)

        stop = asyncio.Event()

        sent = [0]

        async def keep_publishing() -> None:
            while not stop.is_set():  # back to back: one is always awaiting its PUBACK
                await pub.publish(topic, str(sent[0]).encode(), qos=1)
                sent[0] += 1

        sender = asyncio.create_task(keep_publishing())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(broker.restart)
        at_restart = sent[0]
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(sender, 5)  # the old bus sat 10 s on the lost PUBACK
        assert sent[0] > at_restart > 0  # publishing went on after the restart
        await pub.publish(topic, b"after", qos=1)
    assert pub.stats.reconnects >= 1


def test_no_delay_turns_nagle_off_on_tcp_and_leaves_other_sockets_alone() -> None:
    """A service's small packet written while an earlier one waits for its acknowledgement is
    sent at once, not held for it (up to 40 ms of delayed ACK on Linux): every connection to
    the broker is set TCP_NODELAY."""
    import socket

    from offramp.bus.tcp_info import no_delay

    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        no_delay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    left, right = socket.socketpair()  # not TCP: nothing to set, and no error
    with left, right:
        no_delay(left)
    no_delay(None)


async def test_a_connected_bus_sends_without_nagle(bus_settings: BusSettings) -> None:
    async with Bus(bus_settings, "nagle") as bus:
        await bus.wait_connected(5)
        info = bus.tcp_info()
        assert info is not None and info.no_delay


def test_every_broker_offramp_configures_keeps_nagle_on_and_says_so(broker: LocalBroker) -> None:
    """Mosquitto's set_tcp_nodelay is a trade of capacity for latency at low load (README, "The
    broker and Nagle's algorithm"): every broker offramp configures states the same choice,
    Nagle on, and Mosquitto takes the option (the private broker is running with it)."""
    from offramp.local.testbed import TestbedSpec, mosquitto_conf, parse_nodes

    root = Path(__file__).resolve().parent.parent
    assert broker.running
    confs = {"local": broker.config_path.read_text(),
             "testbed": mosquitto_conf(TestbedSpec("t", parse_nodes("nano"), Path("/srv/b"))),
             "compose": (root / "compose/mosquitto.conf").read_text(),
             "k3s": (root / "k3s/base/mosquitto.conf").read_text()}
    for name, conf in confs.items():
        assert "\nset_tcp_nodelay false\n" in conf, name
