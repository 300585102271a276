"""The rehearsal network: its plan, the shaping the kernel does (measured), the system running
in it, and ``down`` after a killed ``up``. Needs root, as CI has; without it these fail with
the reason rather than pass."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offramp.bus import Bus, Topics, from_payload
from offramp.local.client import collect, envelope, publish_frames, wait_for_workers
from offramp.local.netbed import PROFILES, NetbedError, Plan, create, existing, parse_rate, remove
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire import Heartbeat

pytestmark = [pytest.mark.tier("broker"), pytest.mark.exclusive]  # times and rates

HELPERS = Path(__file__).parent / "helpers"
OFFRAMP = [sys.executable, "-m", "offramp.cli"]


def test_the_plan_shapes_both_ends_of_every_link_and_names_fit() -> None:
    plan = Plan("ofx", workers=3, mbps=20.0)
    commands = [" ".join(c) for c in plan.commands()]
    for node in plan.nodes:
        assert len(node.hub_link) <= 15
        towards = [c for c in commands if f"dev {node.hub_link} root tbf rate 20.0mbit" in c]
        away = [c for c in commands if c.startswith(f"ip netns exec {node.namespace} tc qdisc")
                and "dev eth0 root tbf rate 20.0mbit" in c]
        assert len(towards) == len(away) == 1, node
    assert [n.address for n in plan.worker_nodes] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert commands.index("ip netns add ofx-hub") == 0  # made before anything inside it
    assert parse_rate("fe") == 100.0 and parse_rate("7.5") == 7.5
    for bad in ("fast", "0", "-3"):
        with pytest.raises(NetbedError, match="link"):
            parse_rate(bad)
    with pytest.raises(NetbedError, match="letters or digits"):
        Plan("much-too-long")
    with pytest.raises(NetbedError, match="subnet"):
        Plan("ofx", subnet="10.77")


def _transfer(plan: Plan, seconds: float = 2.0) -> float:
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", plan.gateway.namespace, sys.executable,
         str(HELPERS / "tcp_rate.py"), "serve", plan.broker_address, "5001", str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "listening"
    sender = subprocess.Popen(
        ["ip", "netns", "exec", plan.worker_nodes[0].namespace, sys.executable,
         str(HELPERS / "tcp_rate.py"), "send", plan.broker_address, "5001", str(seconds)])
    goodput = float(receiver.stdout.readline())
    receiver.wait(10)
    sender.wait(10)
    return goodput


@pytest.mark.parametrize("profile", list(PROFILES))
def test_a_transfer_over_each_profile_lands_within_ten_percent_of_its_rate(profile: str) -> None:
    """TCP's goodput over a shaped link: the shaper counts Ethernet frames, of which 1448 of
    1514 bytes are payload, so a perfect link gives 0.956 of its rate."""
    plan = Plan("ofs", workers=1, mbps=PROFILES[profile], subnet="10.78.0")
    create(plan)
    try:
        ratio = _transfer(plan) / plan.mbps
    finally:
        remove(plan.name)
    assert 0.9 <= ratio <= 1.02, (profile, ratio)
    assert existing(plan.name) == []


def _frames(url: str, prefix: str, workers: int, n: int) -> tuple[dict[str, str], float]:
    """Answers by frame id, and the longest round trip the workers' heartbeats report for
    their links (measured on their connections to the broker)."""
    async def go() -> tuple[dict[str, str], float]:
        topics = Topics(prefix)
        settings = BusSettings(broker_url=url, topic_prefix=prefix, publish_timeout_s=30)
        async with Bus(settings, f"netbed-test-{os.getpid()}") as bus:
            await bus.wait_connected(20)
            await wait_for_workers(bus, topics, workers, 90)
            states = await bus.subscribe(topics.state_all(), maxsize=10_000,
                                         decode=from_payload(Heartbeat.decode))
            results = await bus.subscribe(topics.results("cam-1"), qos=1, maxsize=10_000)
            images = load_digits().test.images[:n]
            payloads = [envelope(f"n{i}", image=im) for i, im in enumerate(images)]
            await publish_frames(bus, topics.ingest("cam-1"), payloads, 50)
            got = await collect(results, n, 60)
            rtt = 0.0
            while (hb := states.get_nowait()) is not None:
                if hb.segments:  # a worker's
                    rtt = max(rtt, hb.link_rtt_s)
            return {r.frame_id: r.status for r in got.results}, rtt

    return asyncio.run(go())


def test_the_system_answers_through_the_netbed_and_down_cleans_up_after_a_killed_up(
        tiny_bundle: Bundle, tmp_path: Path) -> None:
    name, subnet = "ofk", "10.79.0"
    up = subprocess.Popen([*OFFRAMP, "netbed", "up", "--name", name, "--subnet", subnet,
                           "--workers", "2", "--link", "fe", "--bundle", str(tiny_bundle.root),
                           "--logdir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        banner = up.stdout.readline() + up.stdout.readline()
        assert "publish from this host" in banner, banner + up.stdout.read()
        answers, rtt = _frames(f"mqtt://{subnet}.1:1883", "offramp/v1", 2, 40)
        assert sorted(answers) == sorted(f"n{i}" for i in range(40))
        assert set(answers.values()) == {"ok"}
        assert 0 < rtt < 1.0  # the workers' heartbeats carry their measured links
        pids = {int(p) for ns in existing(name) for p in subprocess.run(
            ["ip", "netns", "pids", ns], check=True, capture_output=True, text=True
        ).stdout.split()}
        assert len(pids) >= 5  # broker, arbiter, scheduler, admission, two workers (and ip)
    finally:
        up.send_signal(signal.SIGKILL)  # no clean-up of its own
        up.wait()
    assert existing(name), "the namespaces outlive a killed up until down"
    down = subprocess.run([*OFFRAMP, "netbed", "down", "--name", name], check=False,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert existing(name) == []
    assert not Path(f"/sys/class/net/{name}-host").exists()
    deadline = time.monotonic() + 5
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, "processes left behind"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
