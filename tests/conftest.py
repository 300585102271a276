"""Shared fixtures: one real Mosquitto per test session, a unique topic prefix per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from filelock import FileLock
from sharing import Machine, share_cores, shared_dir
from tiers import Tiers

from offramp.bus import Bus, Topics
from offramp.local.broker import LocalBroker
from offramp.local.client import wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.build import Recipe, build
from offramp.ml.train import TrainConfig
from offramp.model.bundle import Bundle
from offramp.model.sessions import cuda_available
from offramp.settings import BusSettings

# tests/deploy needs root, podman and the images `make test-deploy` builds; it runs them
collect_ignore = [] if os.environ.get("OFFRAMP_TEST_DEPLOY") else ["deploy"]


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Tiers(), "offramp-tiers")
    config.pluginmanager.register(Machine(), "offramp-machine")
    share_cores()


@pytest.fixture(autouse=True)
def _gpu_or_skip(request: pytest.FixtureRequest) -> None:
    """Tests marked ``gpu`` skip where onnxruntime-gpu is not installed (CI has no GPU), and
    fail there instead when OFFRAMP_TEST_GPU=1 (``make test-gpu``): a GPU run that skipped its
    GPU tests would pass without testing anything."""
    if request.node.get_closest_marker("gpu") is None or cuda_available():
        return
    why = "needs onnxruntime-gpu and a GPU (CI has none)"
    if os.environ.get("OFFRAMP_TEST_GPU") == "1":
        pytest.fail(f"OFFRAMP_TEST_GPU=1, but ONNX Runtime has no CUDA provider: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """A real Mosquitto on a free port with its own config; persistence on, so a restart keeps
    retained messages. Tests may stop and restart it; it is running again after each test."""
    with LocalBroker(persistence=True) as b:
        yield b


@pytest.fixture(autouse=True)
def _broker_running_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "broker" in request.fixturenames:
        b: LocalBroker = request.getfixturevalue("broker")
        if not b.running:
            b.start()


@pytest.fixture
def prefix() -> str:
    return f"offramp-test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topics(prefix: str) -> Topics:
    return Topics(prefix)


@pytest.fixture
def bus_settings(broker: LocalBroker, prefix: str) -> BusSettings:
    return BusSettings(broker_url=broker.url, topic_prefix=prefix, reconnect_min_s=0.05,
                       reconnect_max_s=0.3, publish_timeout_s=5.0)


@pytest.fixture(scope="session")
def tiny_recipe() -> Recipe:
    """A small real model on the real digits data: about 40 s to train on 2 cores."""
    return Recipe("test-tiny", "mobilenetv2", {"width": 0.35, "stem_stride": 2},
                  train=TrainConfig(epochs=8, lr=6e-3))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_recipe: Recipe) -> Bundle:
    """A real ONNX bundle (4 segments, calibrated) trained and exported in this test session:
    by the first xdist worker to ask; the others wait for it and load it."""
    shared = shared_dir(tmp_path_factory)
    with FileLock(shared / "tiny-bundle.lock"):
        bundle, _ = build(tiny_recipe, shared / "tiny-bundle", progress=False)
    return bundle


def _wait_up(system: LocalSystem) -> LocalSystem:
    async def wait() -> None:
        settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix)
        async with Bus(settings, f"test-wait-up-{os.getpid()}") as bus:
            await bus.wait_connected(10)
            await wait_for_workers(bus, Topics(system.prefix), system.workers, 60)

    asyncio.run(wait())
    return system


@pytest.fixture
def up() -> Callable[[LocalSystem], LocalSystem]:
    """``up(system)``: ``system`` once it takes frames (its workers serve, an
    admission-controller holds the ingest session), as a user's system is when a client
    connects."""
    return _wait_up
