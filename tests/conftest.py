"""Shared fixtures: one real Mosquitto per test session, a unique topic prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from offramp.broker import LocalBroker
from offramp.settings import BusSettings
from offramp.topics import Topics


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
