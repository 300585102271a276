"""One contract, three buses: the MQTT bus on both read paths against a real Mosquitto, and
the in-memory bus the in-process tests use. Whatever a service relies on holds on all three."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from offramp.bus import (
    Bus,
    MemoryBroker,
    MemoryBus,
    Message,
    MessageBus,
    Topics,
    Will,
    from_payload,
)
from offramp.errors import BusError
from offramp.settings import BusSettings
from offramp.wire import Heartbeat

MakeBus = Callable[..., MessageBus]


@pytest.fixture(params=["mqtt-fast", "mqtt-library", "memory"])
def make_bus(request: pytest.FixtureRequest, bus_settings: BusSettings) -> MakeBus:
    if request.param == "memory":
        broker = MemoryBroker()

        def memory(client_id: str, **kw: int) -> MessageBus:
            return MemoryBus(broker, client_id, inbound_queue=kw.get("inbound_queue", 1024),
                             max_message_bytes=kw.get("max_message_bytes", 16 << 20))
        return memory
    read_path = request.param.removeprefix("mqtt-")

    def mqtt(client_id: str, **kw: int) -> MessageBus:
        return Bus(replace(bus_settings, bus_read_path=read_path, **kw), client_id)  # type: ignore[arg-type]
    return mqtt


async def _settle(bus: MessageBus, received: int, timeout: float = 5.0) -> None:
    """Until ``bus`` has received ``received`` messages (the broker is asynchronous)."""
    async with asyncio.timeout(timeout):
        while bus.stats.received < received:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.01)


async def test_a_message_arrives_once_with_its_topic_and_payload(make_bus: MakeBus,
                                                                topics: Topics) -> None:
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        sub = await rx.subscribe(topics.ingest_all(), qos=1)
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        await tx.publish(topics.ingest("cam-1"), b"\x00frame", qos=1)
        msg = await asyncio.wait_for(sub.get(), 5)
    assert (msg.topic, msg.payload, msg.retain) == (topics.ingest("cam-1"), b"\x00frame", False)
    assert isinstance(msg, Message) and msg.received > 0


async def test_a_decoding_subscription_yields_values_and_skips_counts_and_logs_the_rest(
        make_bus: MakeBus, topics: Topics) -> None:
    good = Heartbeat(role="worker", node="w1", seq=7)
    with capture_logs() as logs:
        async with make_bus("rx") as rx, make_bus("tx") as tx:
            sub = await rx.subscribe(topics.state_all(), qos=1,
                                     decode=from_payload(Heartbeat.decode))
            await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
            for payload in (b"garbage", b"\x81\xa1v\x07", good.encode()):
                await tx.publish(topics.state("worker", "w1"), payload, qos=1)
            hb = await asyncio.wait_for(sub.get(), 5)
    assert hb == good
    assert rx.stats.undecodable == {topics.state_all(): 2}
    warnings = [e for e in logs if e["event"] == "undecodable_message"]
    assert warnings and warnings[0]["subscription"] == topics.state_all()


async def test_retained_messages_reach_later_subscribers_until_cleared(make_bus: MakeBus,
                                                                      topics: Topics) -> None:
    async with make_bus("tx") as tx:
        await tx.wait_connected(5)
        await tx.publish(topics.plan(), b"plan-1", qos=1, retain=True)
        async with make_bus("late") as late:
            sub = await late.subscribe(topics.plan(), qos=1)
            await late.wait_connected(5)
            msg = await asyncio.wait_for(sub.get(), 5)
            assert (msg.payload, msg.retain) == (b"plan-1", True)
        await tx.publish(topics.plan(), b"", qos=1, retain=True)
        async with make_bus("later") as later:
            sub = await later.subscribe(topics.plan(), qos=1)
            await later.wait_connected(5)
            await asyncio.sleep(0.3)
            assert len(sub.inbox) == 0


async def test_each_message_goes_to_the_subscription_its_topic_matches(make_bus: MakeBus,
                                                                       topics: Topics) -> None:
    """Filters must not overlap (a broker may deliver a message once per matching filter);
    each message lands in the inbox of the one subscription it matches."""
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        frames = await rx.subscribe(topics.ingest_all(), qos=1)
        results = await rx.subscribe(topics.results("cam-1"), qos=1)
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        await tx.publish(topics.ingest("cam-1"), b"one", qos=1)
        await tx.publish(topics.results("cam-1"), b"two", qos=1)
        await tx.publish(topics.results("cam-2"), b"nobody's", qos=1)
        await tx.publish(topics.ingest("cam-2"), b"three", qos=1)
        await _settle(rx, 3)
        await asyncio.sleep(0.1)
    assert [m.payload for m in frames.inbox.drain()] == [b"one", b"three"]
    assert [m.payload for m in results.inbox.drain()] == [b"two"]


@pytest.mark.parametrize(("overflow", "kept"), [("drop-oldest", [b"3", b"4"]),
                                                ("drop-newest", [b"0", b"1"])])
async def test_a_full_inbox_drops_by_its_policy_counts_and_tells(
        make_bus: MakeBus, topics: Topics, overflow: str, kept: list[bytes]) -> None:
    told: list[bytes] = []
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        sub = await rx.subscribe(topics.ingest_all(), qos=1, maxsize=2,
                                 overflow=overflow,  # type: ignore[arg-type]
                                 on_drop=lambda m: told.append(m.payload))
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        for i in range(5):
            await tx.publish(topics.ingest("cam"), str(i).encode(), qos=1)
        await _settle(rx, 5)
    assert [m.payload for m in sub.inbox.drain()] == kept
    assert sorted(told) == sorted({b"0", b"1", b"2", b"3", b"4"} - set(kept))
    assert sum(rx.stats.dropped.values()) == 3


async def test_after_unsubscribing_nothing_more_arrives(make_bus: MakeBus,
                                                        topics: Topics) -> None:
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        sub = await rx.subscribe(topics.ingest_all(), qos=1)
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        await tx.publish(topics.ingest("a"), b"before", qos=1)
        assert (await asyncio.wait_for(sub.get(), 5)).payload == b"before"
        await sub.close()
        await tx.publish(topics.ingest("a"), b"after", qos=1)
        await asyncio.sleep(0.3)
    assert len(sub.inbox) == 0


async def test_shared_subscribers_each_get_a_share_and_no_message_twice(
        make_bus: MakeBus, topics: Topics) -> None:
    topic = topics.act("m", 1)
    async with make_bus("w1") as w1, make_bus("w2") as w2, make_bus("tx") as tx:
        s1 = await w1.subscribe(topic, shared_group="workers", qos=1)
        s2 = await w2.subscribe(topic, shared_group="workers", qos=1)
        await asyncio.gather(w1.wait_connected(5), w2.wait_connected(5), tx.wait_connected(5))
        await asyncio.sleep(0.2)
        for i in range(20):
            await tx.publish(topic, str(i).encode(), qos=1)
        async with asyncio.timeout(5):
            while len(s1.inbox) + len(s2.inbox) < 20:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        a = {m.payload for m in s1.inbox.drain()}
        b = {m.payload for m in s2.inbox.drain()}
    assert len(a) + len(b) == 20 and not a & b and a and b


async def test_an_oversized_message_is_refused_naming_the_limit(make_bus: MakeBus,
                                                               topics: Topics) -> None:
    async with make_bus("big", max_message_bytes=1024) as bus:
        await bus.wait_connected(5)
        with pytest.raises(BusError, match="over OFFRAMP_MAX_MESSAGE_BYTES"):
            await bus.publish(topics.ingest("cam"), b"x" * 2048)


async def test_a_closed_bus_refuses_to_publish(make_bus: MakeBus, topics: Topics) -> None:
    bus = make_bus("closing")
    async with bus:
        await bus.wait_connected(5)
    with pytest.raises(BusError, match="not connected"):
        await bus.publish(topics.ingest("cam"), b"late")


async def test_the_memory_broker_publishes_the_will_of_a_bus_that_crashed(topics: Topics) -> None:
    """What the MQTT broker does on a lost connection (tests/test_bus.py kills a process)."""
    broker = MemoryBroker()
    will = Heartbeat(role="worker", node="doomed", online=False)
    async with MemoryBus(broker, "watcher") as watcher:
        sub = await watcher.subscribe(topics.state_all(), decode=from_payload(Heartbeat.decode))
        doomed = MemoryBus(broker, "doomed",
                           will=Will(topics.state("worker", "doomed"), will.encode()))
        async with doomed:
            pass  # a clean disconnect: no will
        await asyncio.sleep(0)
        assert len(sub.inbox) == 0
        await doomed.__aenter__()
        doomed.crash()
        assert await asyncio.wait_for(sub.get(), 1) == will


async def test_a_detached_subscription_takes_nothing_more_at_once(make_bus: MakeBus,
                                                                  topics: Topics) -> None:
    """What a stopping worker does with its packet subscriptions: no round trip to the broker,
    and what still arrives is counted as unrouted."""
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        sub = await rx.subscribe(topics.ingest_all(), qos=1)
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        sub.detach()
        await tx.publish(topics.ingest("a"), b"late", qos=1)
        await _settle(rx, 1)
    assert len(sub.inbox) == 0 and rx.stats.unrouted == 1


@pytest.mark.parametrize("read_path", ["fast", "library"])
async def test_a_manually_acknowledged_message_comes_again_until_it_is_acknowledged(
        bus_settings: BusSettings, topics: Topics, read_path: str) -> None:
    """What the admission-controller's ingest session rests on: a QoS 1 message not yet
    acknowledged is handed to the next connection with the same client id; one acknowledged
    is not. The receive maximum bounds how many the broker sends before acknowledgements."""
    settings = replace(bus_settings, bus_read_path=read_path)  # type: ignore[arg-type]
    topic = topics.ingest("cam")
    session = f"session-{topics.prefix.rsplit('/', 1)[-1]}"  # a session of this test's own
    async with Bus(settings, "tx") as tx:
        await tx.wait_connected(5)
        async with Bus(settings, session, manual_ack=True, receive_maximum=2) as rx:
            sub = await rx.subscribe(topic, qos=1)
            await rx.wait_connected(5)
            for i in range(5):
                await tx.publish(topic, str(i).encode(), qos=1)
            first = [await asyncio.wait_for(sub.get(), 5) for _ in range(2)]
            await asyncio.sleep(0.3)
            assert len(sub.inbox) == 0  # the broker waits: two unacknowledged already
            rx.ack(first[0])
            third = await asyncio.wait_for(sub.get(), 5)
            assert [m.payload for m in (*first, third)] == [b"0", b"1", b"2"]
            rx.ack(third)
            await asyncio.sleep(0.2)
        # gone without acknowledging 1 (and with 3 and 4 queued): the next one gets them
        async with Bus(settings, session, manual_ack=True) as again:
            sub = await again.subscribe(topic, qos=1)
            await again.wait_connected(5)
            last = [await asyncio.wait_for(sub.get(), 5) for _ in range(3)]
            await asyncio.sleep(0.2)
            last += sub.inbox.drain()
            for m in last:
                again.ack(m)
    assert sorted(m.payload for m in last) == [b"1", b"3", b"4"]


async def test_a_reply_carries_the_correlation_data(make_bus: MakeBus, topics: Topics) -> None:
    async with make_bus("rx") as rx, make_bus("tx") as tx:
        sub = await rx.subscribe(topics.results_all(), qos=1)
        await asyncio.gather(rx.wait_connected(5), tx.wait_connected(5))
        await tx.publish(topics.results("cam"), b"{}", qos=1, response_topic="replies/x",
                         correlation_data=b"\x00id-7")
        msg = await asyncio.wait_for(sub.get(), 5)
    assert (msg.response_topic, msg.correlation_data) == ("replies/x", b"\x00id-7")
