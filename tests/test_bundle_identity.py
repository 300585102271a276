"""Services started on different bundles: told apart by the bundle's identity, and frames
that no worker can serve answered ``error`` instead of held."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from sharing import port_base

from offramp.local.broker import free_run
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle, load_bundle
from offramp.node.health import probe
from offramp.node.peers import PeerTable
from offramp.policy.bundles import conflicts, model_of, unserved
from offramp.wire import Heartbeat, SegmentLoad

pytestmark = pytest.mark.tier("inproc")


def _variant(bundle: Bundle, root: Path, **manifest: object) -> Bundle:
    shutil.copytree(bundle.root, root)
    data = json.loads((root / "manifest.json").read_text())
    data.update(manifest)
    (root / "manifest.json").write_text(json.dumps(data))
    return load_bundle(root)


def test_a_bundles_identity_follows_its_graphs_and_structure_not_its_calibration(
        tiny_bundle: Bundle, tmp_path: Path) -> None:
    name, _, digest = tiny_bundle.identity.partition("@")
    assert name == tiny_bundle.name and len(digest) == 12
    copy = _variant(tiny_bundle, tmp_path / "copy")
    assert copy.identity == tiny_bundle.identity  # another folder, the same model
    recalibrated = _variant(tiny_bundle, tmp_path / "recal", calibration={}, metrics={"x": 1})
    assert recalibrated.identity == tiny_bundle.identity
    relabelled = _variant(tiny_bundle, tmp_path / "relabel",
                          classes=[f"c{i}" for i in range(len(tiny_bundle.manifest.classes))])
    assert relabelled.identity != tiny_bundle.identity
    regraphed = _variant(tiny_bundle, tmp_path / "regraph")
    seg = regraphed.path(regraphed.manifest.segments[0].file)
    seg.write_bytes(seg.read_bytes() + b"\0")  # other bytes in a graph a worker runs
    assert load_bundle(regraphed.root).identity != tiny_bundle.identity


def test_bundles_conflict_only_under_one_model_name() -> None:
    assert model_of("demo@0123456789ab") == "demo" and model_of("demo") == "demo"
    assert conflicts("demo@aaa", "demo@bbb")
    assert not conflicts("demo@aaa", "demo@aaa")
    assert not conflicts("demo@aaa", "other@bbb")  # another model: served beside it
    assert not conflicts("demo@aaa", "") and not conflicts("", "demo@bbb")  # does not say


def test_frames_are_unserved_only_while_every_online_worker_serves_another_bundle() -> None:
    assert unserved("demo@a", {}) is None  # none online yet: frames wait for one
    assert unserved("demo@a", {"w1": "demo@a", "w2": "demo@b"}) is None
    assert unserved("demo@a", {"w1": ""}) is None  # a worker that does not say may serve it
    why = unserved("demo@a", {"w1": "fashion@c", "w2": "demo@b"})
    assert why is not None
    assert "demo@a" in why and "w1 serves fashion@c" in why and "w2 serves demo@b" in why
    many = unserved("demo@a", {f"w{i:02d}": "x@1" for i in range(20)})
    assert many is not None and "and 12 more" in many


def _worker(node: str, bundle: str, *, online: bool = True) -> Heartbeat:
    return Heartbeat(role="worker", node=node, online=online, bundle=bundle,
                     segments=(SegmentLoad(model="demo", segment=1, service_rate=100.0),))


def test_a_peer_serving_other_graphs_of_the_model_is_kept_apart() -> None:
    peers = PeerTable("adm", "demo@a")
    assert not peers.update(_worker("w1", "demo@a"), now=0.0)
    assert not peers.update(_worker("w2", "demo@b"), now=0.0)
    assert [c.node for c in peers.candidates("demo", 1, now=0.0)] == ["w1"]
    assert set(peers.conflicting) == {"w2"}
    assert peers.bundles("worker", 1.0, now=0.5) == {"w1": "demo@a", "w2": "demo@b"}
    assert peers.bundles("worker", 1.0, now=5.0) == {}  # neither heard from since
    # w1 restarted on the other bundle: gone as a peer (its tasks go elsewhere), kept apart
    assert peers.update(_worker("w1", "demo@b"), now=1.0)
    assert peers.candidates("demo", 1, now=1.0) == []
    # w2 came back on this bundle, and w1 went offline
    assert not peers.update(_worker("w2", "demo@a"), now=2.0)
    assert not peers.update(_worker("w1", "demo@b", online=False), now=2.0)
    assert [c.node for c in peers.candidates("demo", 1, now=2.0)] == ["w2"]
    assert peers.conflicting == {}


def test_an_admission_controller_on_another_bundle_answers_error_and_is_not_ready(
        tiny_bundle: Bundle, tmp_path: Path, prefix: str) -> None:
    """The admission-controller on a bundle that no worker serves (here the same model
    relabelled): every frame is answered ``error`` naming both bundles within the progress
    timeout, /readyz says why, and the log says it once. Before, each frame was held,
    without a word, until the admission-controller stopped."""
    from test_system import FAST, _frames, _run

    other = _variant(tiny_bundle, tmp_path / "other",
                     classes=[f"c{i}" for i in range(len(tiny_bundle.manifest.classes))])
    http = free_run(5, port_base(19400))
    env = {**FAST, "OFFRAMP_ADMISSION_BUNDLE": str(other.root)}
    _, payloads = _frames(10)
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=env, http_base=http) as system:
        results = asyncio.run(_run(system, payloads, rate=50, timeout=30))
        ready, said = probe("/readyz", system.http_ports()["admission-1"])
        worker_ready, _ = probe("/readyz", system.http_ports()["worker-1"])
        logs = system.logs(1 << 22)
        system.stop()
    assert sorted(r.frame_id for r in results) == sorted(f"f{i}" for i in range(10))
    assert {r.status for r in results} == {"error"}, results
    why = results[0].error or ""
    assert f"no segment-worker serves bundle {other.identity}" in why
    assert f"serves {tiny_bundle.identity}" in why
    assert not ready and "no segment-worker serves bundle" in said, said
    assert worker_ready  # the workers serve their bundle; the admission-controller says why
    assert logs.count('"bundle_unserved"') == 1
