"""The testbed's planning, without an engine: node profiles, the containers it would start and
the broker it would configure. tests/deploy/test_testbed.py drives a real engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from offramp.errors import SettingsError
from offramp.local.testbed import PROFILES, TestbedSpec, containers, mosquitto_conf, parse_nodes


def test_node_lists_expand_to_named_nodes_with_their_profiles() -> None:
    nodes = parse_nodes("nano:2, orin-nano,nano")
    assert [n for n, _ in nodes] == ["nano-1", "nano-2", "orin-nano-1", "nano-3"]
    assert [p.name for _, p in nodes] == ["nano", "nano", "orin-nano", "nano"]


@pytest.mark.parametrize(("spec", "says"), [
    ("tx2", "unknown node profile 'tx2'"), ("nano:two", "whole number"),
    ("nano:0", "between 1 and 64"), (" , ", "no nodes")])
def test_bad_node_lists_say_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        parse_nodes(spec)


def test_profiles_are_ordered_by_speed_and_fit_their_boards() -> None:
    cpus = [p.cpus for p in PROFILES.values()]
    assert cpus == sorted(cpus)
    assert PROFILES["nano"].memory == "4g" and PROFILES["nano"].threads == 1
    assert PROFILES["agx-orin"].threads == 4


def _spec(network: str = "bridge") -> TestbedSpec:
    return TestbedSpec("bed", parse_nodes("nano,orin-nano"), Path("/srv/bundles/demo"),
                       network=network, port=1999)  # type: ignore[arg-type]


def test_bridge_testbed_broker_first_gateway_then_limited_workers() -> None:
    plan = containers(_spec(), Path("/state/bed"))
    assert [c.name for c in plan] == ["bed-broker", "bed-admission-1", "bed-exit-1",
                                      "bed-priority-1", "bed-nano-1", "bed-orin-nano-1"]
    broker, *services = plan
    assert broker.ports == {"1883/tcp": ("127.0.0.1", 1999)}
    assert broker.volumes == {"/state/bed": {"bind": "/testbed", "mode": "ro"}}
    for c in services:
        assert c.environment["OFFRAMP_BROKER_URL"] == "mqtt://bed-broker:1883"
        assert c.environment["OFFRAMP_WORKER_BUNDLE"] == "/bundles/demo"
        assert c.volumes == {"/srv/bundles/demo": {"bind": "/bundles/demo", "mode": "ro"}}
        assert c.labels["io.offramp.testbed"] == "bed"
    nano, orin = plan[-2:]
    assert (nano.nano_cpus, nano.mem_limit, nano.image) == \
        (500_000_000, "4g", "offramp/segment-worker:latest")
    assert (orin.nano_cpus, orin.environment["OFFRAMP_WORKER_THREADS"]) == (1_500_000_000, "2")
    assert all(c.nano_cpus is None for c in plan[:4])  # the gateway is not limited
    assert "listener 1883 0.0.0.0" in mosquitto_conf(_spec())


def test_host_network_testbed_shares_loopback_with_distinct_ports() -> None:
    spec = _spec("host")
    plan = containers(spec, Path("/state/bed"))
    assert plan[0].ports == {}
    assert {c.environment["OFFRAMP_BROKER_URL"] for c in plan[1:]} == {"mqtt://127.0.0.1:1999"}
    ports = [c.environment["OFFRAMP_HTTP_PORT"] for c in plan[1:]]
    assert len(set(ports)) == len(ports)
    conf = mosquitto_conf(spec)
    assert "listener 1999 127.0.0.1" in conf and "persistence false" in conf


def test_bad_testbed_settings_are_refused() -> None:
    with pytest.raises(SettingsError, match="letters, digits"):
        TestbedSpec("bad name!", parse_nodes("nano"), Path("b"))
    with pytest.raises(SettingsError, match="bridge or host"):
        TestbedSpec("bed", parse_nodes("nano"), Path("b"), network="overlay")  # type: ignore[arg-type]
