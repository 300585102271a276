"""Links measured and codecs chosen by bytes: the pure policies, the kernel's TCP counters on a
real socket, and the whole chain (the bus's connection, the meter) over a shaped link of the
rehearsal network."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from offramp.bus import tcp_info
from offramp.local.broker import LocalBroker
from offramp.local.client import envelope, png_bytes
from offramp.local.netbed import Plan, create, netns_exec, remove
from offramp.local.system import LocalSystem, split_segments
from offramp.model.bundle import Bundle, load_bundle
from offramp.node.peers import PeerTable
from offramp.policy.codecs import CodecOption, choose_codec
from offramp.policy.links import LinkMeter, PathMeter, QueuePeak, paced
from offramp.policy.offload import Candidate, choose
from offramp.wire import Heartbeat, SegmentLoad

pytestmark = pytest.mark.tier("broker")

HELPERS = Path(__file__).parent / "helpers"


# -- the meter --------------------------------------------------------------------------------
def test_the_meter_counts_busy_time_only_and_waits_for_a_full_window() -> None:
    m = LinkMeter(min_bytes=1000, min_busy_s=0.01)
    m.observe(0, 0, 500)
    assert m.bytes_per_s == 0.0 and m.rtt_s == 0.0005  # one reading: no window yet
    m.observe(600, 5_000, 500)
    assert m.bytes_per_s == 0.0  # too few bytes to close a window
    m.observe(2_000, 20_000, 500)  # 2000 B in 20 ms busy (however long the wall clock took)
    assert m.bytes_per_s == pytest.approx(100_000) and m.windows == 1
    m.observe(4_000, 60_000, 0)  # 2000 B in 40 ms: the mean moves towards 50 kB/s
    assert m.bytes_per_s == pytest.approx(0.7 * 100_000 + 0.3 * 50_000)
    assert m.rtt_s == 0.0005  # a reading without a round trip keeps the last one


def test_the_meter_starts_a_new_window_on_a_new_connection() -> None:
    m = LinkMeter(min_bytes=1000, min_busy_s=0.001)
    m.observe(10_000_000, 10_000_000, 100)
    m.observe(1_000, 100, 100)  # counters went back: a reconnect, not a negative rate
    assert m.bytes_per_s == 0.0
    m.observe(3_000, 2_100, 100)
    assert m.bytes_per_s == pytest.approx(1_000_000)
    with pytest.raises(ValueError, match="positive"):
        LinkMeter(min_bytes=0)


def test_the_path_meter_counts_packets_that_arrived_back_to_back() -> None:
    m = PathMeter(min_bytes=1000, min_busy_s=0.01)
    m.observe("a", 500, sent=0.0, arrived=1.0)  # the first: into an idle path, says nothing
    m.observe("a", 500, sent=0.5, arrived=1.5)  # sent before the one ahead arrived
    assert m.rates() == {}  # 500 B: the window is not full yet
    m.observe("a", 500, sent=0.6, arrived=2.0)
    assert m.rates() == {"a": pytest.approx(1000)}  # 1000 B over 1 s of back-to-back arrivals
    m.observe("a", 100_000, sent=5.0, arrived=6.0)  # sent into an idle path: skipped
    m.observe("b", 9_999, sent=0.0, arrived=6.0)
    assert m.rates() == {"a": pytest.approx(1000)}
    few = PathMeter(max_senders=2)
    for sender in ("a", "b", "c"):
        few.observe(sender, 1, 0.0, 1.0)
    assert few.senders() == ["b", "c"]  # the oldest sender is forgotten


def test_the_rate_to_a_worker_is_what_it_measured_from_this_node() -> None:
    peers = PeerTable("w1")
    load = SegmentLoad(model="m", segment=2, service_rate=100.0)
    peers.update(Heartbeat(role="worker", node="w2", segments=(load,),
                           paths={"w1": 2.5e6, "w9": 1.0}))
    peers.update(Heartbeat(role="worker", node="w3", segments=(load,)))
    assert peers.rate_to("w2", 1e9) == 2.5e6  # the path, not this node's fast link
    assert peers.rate_to("w3", 1e9) == 1e9 and peers.rate_to("w4", 0.0) == 0.0
    assert {c.node: c.link_bytes_per_s for c in peers.candidates("m", 2, link_bps=1e9)} == {
        "w2": 2.5e6, "w3": 1e9}
    back = Heartbeat.decode(Heartbeat(role="worker", node="w2", paths={"w1": 2.5e6}).encode())
    assert back.paths == {"w1": 2.5e6}


# -- the codec choice -------------------------------------------------------------------------
OPTIONS = [CodecOption("raw", 400_000), CodecOption("fp16", 200_000, 0.0004, 0.0002, 0.0),
           CodecOption("int8", 100_000, 0.0008, 0.0004, 0.3),
           CodecOption("ae", 25_000, 0.002, 0.003, 0.8)]


@pytest.mark.parametrize(("rate", "max_loss", "want"), [
    (1.25e9, 1.0, "raw"),  # 10 GbE: 0.3 ms raw; halving it costs more than it saves
    (125e6, 1.0, "int8"),  # gbe: 3.2 ms raw, 2.2 fp16, 2.0 int8, 5.2 ae (its compute)
    (125e6, 0.0, "fp16"),  # ... and with no loss allowed
    (12.5e6, 1.0, "ae"),  # fe: 32 ms raw, 7 ms ae
    (2.5e6, 1.0, "ae"),  # wifi
    (2.5e6, 0.5, "int8"),  # the autoencoder loses too much for this budget
    (2.5e6, 0.0, "fp16"),
    (0.0, 1.0, "raw"),  # not measured yet: the cheapest to compute
])
def test_the_codec_with_least_expected_time_within_the_loss_budget(
        rate: float, max_loss: float, want: str) -> None:
    got = choose_codec(OPTIONS, rate, max_loss=max_loss)
    costs = {o.codec: o.cost_s(rate) for o in OPTIONS}
    assert got.codec == want, costs


def test_a_codec_never_measured_is_not_chosen() -> None:
    options = [CodecOption("raw", 400_000), CodecOption("int8", 100_000, loss=None)]
    assert choose_codec(options, 1e6, max_loss=5.0).codec == "raw"
    with pytest.raises(ValueError, match="raw"):
        choose_codec(options[1:], 1e6, max_loss=5.0)


def test_placement_counts_the_bytes_the_codec_sends_not_the_raw_ones() -> None:
    """A busy node beside an idle neighbour over a 20 Mbit/s link, 300 KB of raw activation
    per sample: raw, the transfer (0.12 s) costs more than waiting here (0.08 s); int8 sends a
    quarter of it (and costs 1 ms to encode and decode), so the neighbour wins."""
    local = Candidate("here", backlog_s=0.08, service_s=0.01, local=True)
    raw = Candidate("there", backlog_s=0.0, service_s=0.01, link_bytes_per_s=2.5e6)
    int8 = replace(raw, wire_ratio=0.25, codec_s_per_byte=1e-3 / 300_000)
    assert choose([local, raw], 300_000).node == "here"
    got = choose([local, int8], 300_000)
    assert got.node == "there"
    assert got.cost_s == pytest.approx(0.03 + 0.001 + 0.01)


# -- the kernel's counters --------------------------------------------------------------------
def test_tcp_info_reads_what_a_real_connection_carried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        reader = threading.Thread(target=lambda: [None for _ in iter(lambda: conn.recv(1 << 20),
                                                                    b"")])
        reader.start()
        before = tcp_info.read(client)
        client.sendall(bytes(8 << 20))
        client.shutdown(socket.SHUT_WR)
        reader.join(10)
        # The peer's FIN acknowledges every byte before it: once the client reads EOF, the
        # kernel has seen the last ACK (reading right after the reader ends races it).
        conn.shutdown(socket.SHUT_WR)
        client.settimeout(10)
        assert client.recv(1) == b""
        after = tcp_info.read(client)
        client.close()
        conn.close()
    assert before is not None and after is not None
    assert after.bytes_acked - before.bytes_acked >= 8 << 20
    assert after.rtt_us > 0
    assert tcp_info.read(None) is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert tcp_info.read(udp) is None  # not TCP: unknown, not an error


def test_tcp_info_counts_what_waits_in_the_socket_unsent() -> None:
    """A peer that does not read: what the application wrote and the kernel could not send
    yet is ``notsent_bytes`` (what a heartbeat published now would wait behind)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        client.setblocking(False)
        written = 0
        with contextlib.suppress(BlockingIOError):
            while written < 64 << 20:
                written += client.send(bytes(1 << 16))
        info = tcp_info.read(client)
        client.close()
        conn.close()
    assert info is not None
    assert 0 < info.notsent_bytes <= written
    assert 0 <= info.unacked_bytes <= written


def test_a_node_busy_sending_is_given_its_queue_before_it_is_called_silent() -> None:
    """The admission-controller re-dispatches what a silent worker holds. A worker whose
    heartbeat said 1.5 s of data wait to go out is silent after 0.75 + 2 x 1.5 s, not 0.75 s:
    its next heartbeat is behind that data (over a 20 Mbit/s link, a window of 32 frames of
    294 KiB made the admission-controller re-dispatch every ~8 s and the link carry 2.7 times
    the bytes per answered frame)."""
    peers = PeerTable("admission-1")
    peers.update(Heartbeat(role="worker", node="idle"), now=100.0)
    peers.update(Heartbeat(role="worker", node="busy", queue_s=1.5), now=100.0)
    peers.update(Heartbeat(role="worker", node="liar", queue_s=1e9), now=100.0)
    assert not peers.silent("idle", 0.75, now=100.7) and peers.silent("idle", 0.75, now=100.8)
    assert not peers.silent("busy", 0.75, now=103.7) and peers.silent("busy", 0.75, now=103.8)
    assert peers.silent("liar", 0.75, now=161.0)  # the allowance is capped at a minute
    assert not peers.silent("unknown", 0.75, now=1000.0)
    wire = Heartbeat(role="worker", node="busy", queue_s=1.5)
    assert Heartbeat.decode(wire.encode()).queue_s == 1.5


def test_the_queue_a_heartbeat_reports_is_the_longest_of_the_last_two_seconds() -> None:
    """A burst queued between two heartbeats delays the next one: it must be in the figure
    the heartbeat after it carries, not only the queue at the instant it is built."""
    peak = QueuePeak(window_s=2.0)
    assert peak.value(0.0) == 0.0
    peak.add(0.0, 0.2)
    peak.add(0.1, 1.3)  # a burst of activation packets
    peak.add(0.3, 0.0)  # drained by the time the heartbeat samples
    assert peak.value(0.3) == 1.3
    peak.add(1.5, 0.4)
    assert peak.value(2.05) == 1.3 and peak.value(2.2) == 0.4
    assert peak.value(3.6) == 0.0  # nothing left in the window


# -- over a shaped link -----------------------------------------------------------------------
WIFI_TCP = 0.956 * 20e6 / 8  # what TCP carries over 20 Mbit/s: Ethernet and IP headers


@contextlib.contextmanager
def _wifi(name: str, subnet: str) -> Iterator[tuple[Plan, LocalBroker]]:
    """A netbed of one worker namespace, every link at 20 Mbit/s, the broker in the
    gateway's namespace."""
    plan = Plan(name, workers=1, mbps=20.0, subnet=subnet)
    create(plan)
    try:
        with LocalBroker(1883, host=plan.broker_address,
                         wrap=netns_exec(plan.gateway.namespace)) as broker:
            yield plan, broker
    finally:
        remove(plan.name)


def _helper(namespace: str, *args: str) -> list[str]:
    return [*netns_exec(namespace), sys.executable, str(HELPERS / args[0]), *args[1:]]


@pytest.mark.exclusive
def test_the_bus_measures_the_shaped_link_it_sends_over() -> None:
    """A client in a worker's namespace publishes over the 20 Mbit/s link to the broker: its
    meter, fed by the bus's connection counters, lands within 10% of what TCP carries. Just
    after publishing 6 MB, most of it is still undelivered (what a heartbeat published then
    would wait behind, ``queue_s``); once all is acknowledged, nothing is."""
    with _wifi("ofl", "10.76.0") as (plan, broker):
        out = subprocess.run(_helper(plan.worker_nodes[0].namespace, "bus_link.py", broker.url,
                                     "6000000"),
                             check=True, capture_output=True, text=True, timeout=60)
    measured = float(out.stdout.split()[-1])
    assert 0.9 <= measured / WIFI_TCP <= 1.1, (measured, out.stderr[-2000:])
    queued, after = (int(v) for v in out.stdout.split("unsent ")[1].split()[:2])
    assert queued >= 3_000_000 and after < 64 * 1024, (queued, after)


@pytest.mark.exclusive
def test_a_receiver_measures_the_path_from_its_sender() -> None:
    """The sender in the gateway's namespace, next to the broker (its own link is fast), the
    receiver behind the 20 Mbit/s link: only the receiver can see the path's rate, and its
    meter lands within 10% of what TCP carries there."""
    with _wifi("ofp", "10.74.0") as (plan, broker):
        receiver = subprocess.Popen(_helper(plan.worker_nodes[0].namespace, "bus_path.py",
                                            "receive", broker.url, "6000000"),
                                    stdout=subprocess.PIPE, text=True)
        assert receiver.stdout is not None
        while (line := receiver.stdout.readline()) and line.strip() != "subscribed":
            pass  # the bus's own log lines
        sender = subprocess.Popen(_helper(plan.gateway.namespace, "bus_path.py", "send",
                                          broker.url, "6000000"))
        try:
            measured = float(receiver.communicate(timeout=60)[0].split()[-1])
        finally:
            sender.kill()
            sender.wait()
    assert 0.9 <= measured / WIFI_TCP <= 1.1, measured


# -- the codecs in the system -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ae_bundle(tiny_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny bundle with an autoencoder at the cut two workers split it at, and the codecs'
    accuracy there recorded, as ``offramp compress`` leaves it. Its latent is one channel, so
    that it surely loses accuracy (a milder one can lose none on this model)."""
    from offramp.ml.build import Recipe, load_data, load_trained
    from offramp.ml.compress import (
        compare_codecs,
        export_autoencoder,
        record_codecs,
        train_autoencoder,
    )

    root = tmp_path_factory.mktemp("ae") / "tiny-ae"
    shutil.copytree(tiny_bundle.root, root)
    bundle = load_bundle(root)
    cut = _cut(bundle)
    model = load_trained(root / "model.pt")
    data = load_data(Recipe("t", "mobilenetv2", {}))
    act = bundle.segment(cut).activation
    assert act is not None
    ratio = act.per_sample[0]
    enc, dec = train_autoencoder(model, bundle, data, cut, ratio, epochs=1)
    export_autoencoder(bundle, cut, ratio, enc, dec)
    record_codecs(bundle, cut, compare_codecs(model, bundle, data, cut, {ratio: (enc, dec)}))
    return load_bundle(root)


def _cut(bundle: Bundle) -> int:
    """The cut between the two workers of a LocalSystem."""
    return split_segments([s.flops for s in bundle.manifest.segments], 2)[0][-1]


def test_a_worker_tells_placement_what_its_codec_sends(tiny_bundle: Bundle) -> None:
    """Raw until the cut's options were measured (its first send); then, pinned to int8, a
    quarter of the raw bytes and some encode and decode time; automatic on a fast link, raw."""
    from segment_worker.codecs import Codecs

    async def offload(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def codecs(mode: str) -> Codecs:
        return Codecs(tiny_bundle, mode=mode, max_loss=1.0, batch=4, offload=offload,
                      log=structlog.get_logger())

    pinned, auto = codecs("int8"), codecs("auto")
    assert pinned.wire(1, 2.5e6) == (1.0, 0.0)
    asyncio.run(pinned.options(1))
    asyncio.run(auto.options(1))
    ratio, codec_s = pinned.wire(1, 2.5e6)
    assert ratio == pytest.approx(0.25, rel=0.01) and codec_s > 0
    assert auto.wire(1, 1e12) == (1.0, 0.0)


def test_the_plan_counts_the_smallest_codec_within_the_loss_budget(tiny_bundle: Bundle,
                                                                    tmp_path: Path) -> None:
    """What the scheduler's plan counts per cut: the fewest bytes among the codecs whose
    recorded loss fits the budget, raw where nothing was recorded, nothing after the last."""
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, root)
    bundle = load_bundle(root)
    raw = bundle.segment(1).activation_bytes
    bundle.manifest.metrics["codecs"] = {"1": {
        "raw": {"bytes_per_sample": raw, "accuracy": 0.90},
        "fp16": {"bytes_per_sample": raw // 2, "accuracy": 0.90},
        "int8": {"bytes_per_sample": raw // 4, "accuracy": 0.895},
        "ae-r4": {"bytes_per_sample": raw // 8, "accuracy": 0.85}}}
    assert bundle.wire_bytes(1, 0.0) == raw // 2
    assert bundle.wire_bytes(1, 1.0) == raw // 4
    assert bundle.wire_bytes(1, 10.0) == raw // 8
    assert bundle.wire_bytes(2, 10.0) == bundle.segment(2).activation_bytes
    assert bundle.wire_bytes(bundle.num_segments, 10.0) == 0


def _chosen(system: LocalSystem) -> set[str]:
    return {json.loads(line)["codec"] for line in system.logs(1 << 22).splitlines()
            if '"codec_chosen"' in line}


@pytest.mark.parametrize(("env", "want"), [
    ({"OFFRAMP_WORKER_CODEC": "ae"}, "ae"),  # pinned
    ({"OFFRAMP_WORKER_LINK_MBPS": "2", "OFFRAMP_WORKER_CODEC_MAX_LOSS": "100"}, "ae"),
    ({"OFFRAMP_WORKER_LINK_MBPS": "2", "OFFRAMP_WORKER_CODEC_MAX_LOSS": "0"}, "lossless"),
])
def test_activations_cross_the_cut_by_the_codec_chosen_and_every_frame_is_answered(
        ae_bundle: Bundle, prefix: str, env: dict[str, str], want: str) -> None:
    """Two workers split at the autoencoder's cut. Pinned, or automatic on a slow (emulated)
    link with a loss budget the autoencoder fits, the latent crosses and is decoded on the
    other side. With no loss allowed, the choice is among the codecs that lost nothing in the
    bundle's calibration, never the autoencoder (which did)."""
    from test_system import FAST, _frames, _run

    cut = _cut(ae_bundle)
    accuracy = ae_bundle.codec_accuracy(cut)
    ae = f"ae-r{ae_bundle.autoencoders_at(cut)[0].ratio}"
    lossless = {c for c, a in accuracy.items() if a >= accuracy["raw"]}
    assert ae not in lossless, accuracy  # else the last case would test nothing
    _, payloads = _frames(60)
    worker_env = {"OFFRAMP_WORKER_FOLLOW_PLAN": "false", **env}
    with LocalSystem(ae_bundle, 2, prefix=prefix, env=FAST, worker_env=worker_env) as system:
        results = asyncio.run(_run(system, payloads, rate=60))
        chosen = _chosen(system)
        system.stop()
    assert sorted(r.frame_id for r in results) == sorted(f"f{i}" for i in range(60))
    assert {r.status for r in results} == {"ok"}
    if want == "lossless":
        assert chosen and chosen <= lossless, (chosen, accuracy)
    else:
        assert chosen == {ae}


@pytest.mark.parametrize(("first_hop", "frames_per_packet"),
                         [("tensor", 1.5), ("tensor", 0.5), ("frames", 1.5)])
def test_packets_over_a_small_brokers_limit_are_split_or_their_frames_answered_at_once(
        tiny_bundle: Bundle, prefix: str, frames_per_packet: float, first_hop: str) -> None:
    """A broker that takes packets of about one and a half frames' first hop (the model's input
    tensor, or the camera's encoded image): every batch the admission-controller dispatches
    crosses as several packets, and every frame is answered once, ``ok``. One that takes half a
    frame: no frame can ever cross, and each is answered ``error`` at once, naming both sizes
    (not after three dispatches). A camera's image that the broker took on ingest fits it as a
    first hop too, so half a frame applies to the tensor first hop only."""
    from test_system import FAST, _frames, _run

    if first_hop == "tensor":
        spec = tiny_bundle.manifest.input
        frame = 4 * spec.channels * spec.height * spec.width
        _, payloads = _frames(60)
    else:  # noise does not compress: each PNG is about as large as its pixels
        rng = np.random.default_rng(7)
        images = rng.integers(0, 256, size=(60, 96, 96, 3), dtype=np.uint8)
        pngs = [png_bytes(im) for im in images]
        frame = max(len(b) for b in pngs)
        payloads = [envelope(f"f{i}", image=im) for i, im in enumerate(images)]
    env = {**FAST, "OFFRAMP_ADMISSION_FIRST_HOP": first_hop}
    with LocalBroker(max_packet_bytes=int(frame * frames_per_packet) + 2048) as broker, \
            LocalSystem(tiny_bundle, 2, broker_url=broker.url, prefix=prefix, env=env) as system:
        results = asyncio.run(_run(system, payloads, rate=400))
        logs = system.logs(1 << 22)
        system.stop()
    assert sorted(r.frame_id for r in results) == sorted(f"f{i}" for i in range(60))
    if frames_per_packet > 1:
        assert {r.status for r in results} == {"ok"}
        assert '"batch_split"' in logs
    else:
        assert {r.status for r in results} == {"error"}
        assert all("over the" in (r.error or "") and "bytes the broker takes" in (r.error or "")
                   for r in results), results[0].error
        assert '"frame_too_large"' in logs and "no result after" not in logs


def test_a_sender_puts_only_so_much_into_its_connection_at_once() -> None:
    """Pacing by link time: the samples for other nodes are cut, in order, to what the send
    queue's budget holds; the local part goes whole; one sample goes when any budget is left
    (however large it is), none when the queue is already full."""
    parts = [("here", 5), ("a", 4), ("b", 4)]
    assert paced(parts, "here", 100.0, 650.0) == [("here", 5), ("a", 4), ("b", 2)]
    assert paced(parts, "here", 100.0, 10_000.0) == parts
    assert paced(parts, "here", 1000.0, 10.0) == [("here", 5), ("a", 1), ("b", 0)]
    assert paced(parts, "here", 100.0, -5.0) == [("here", 5), ("a", 0), ("b", 0)]
