"""Test tiers: every test is in exactly one, so that each can run alone (``pytest -m pure``)
and the run says what each cost.

- ``pure``: no broker, no process, no model built: policies, wire formats, settings.
- ``inproc``: real ONNX models built in the session, or services in this process (their bus
  in memory): the data path without the network.
- ``broker``: a real Mosquitto the tests start, and the services as real processes: signals,
  wills, sessions, restarts.
- ``deploy``: the container images and manifests (``make test-deploy``).

A test's tier is the highest of what it uses and what it (or its module) is marked: a test
under ``tests/deploy`` is ``deploy``; one that asks for a fixture of the real broker is at
least ``broker``; one that asks for a model built in the session at least ``inproc``. A
module (or test) that starts processes, a bus or a training run without those fixtures says
so: ``pytestmark = pytest.mark.tier("broker")``. ``-m`` selects on the tier it ends up in.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

TIERS = ("pure", "inproc", "broker", "deploy")
BROKER_FIXTURES = frozenset({"broker", "bus_settings", "prefix", "topics", "up"})
MODEL_FIXTURES = frozenset({"tiny_bundle", "tiny_recipe"})


def tier_of(item: pytest.Item) -> str:
    used = {str(m.args[0]) for m in item.iter_markers("tier")}
    if unknown := used - set(TIERS):
        raise pytest.UsageError(f"{item.nodeid}: unknown tier {sorted(unknown)}; one of {TIERS}")
    names = set(getattr(item, "fixturenames", ()))
    if "deploy" in item.path.parts:
        used.add("deploy")
    if names & BROKER_FIXTURES:
        used.add("broker")
    if names & MODEL_FIXTURES:
        used.add("inproc")
    return max(used, key=TIERS.index, default="pure")


class Tiers:
    """Gives each collected test its tier's marker (before ``-m`` selects) and adds up the
    time each tier took (set-up, call and tear-down), printed at the end of the run. Under
    xdist the sums are of the workers' times, so they add up to more than the wall time."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.tests: Counter[str] = Counter()
        self.started = time.monotonic()

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            tier = tier_of(item)
            item.add_marker(tier)
            item.user_properties.append(("tier", tier))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # user properties travel with the report to xdist's controller, which collects
        # nothing itself (a keyword would also match a test or parameter named "broker")
        tier = dict(report.user_properties).get("tier")
        if tier is None:
            return
        self.seconds[tier] += report.duration
        if report.when == "call":
            self.tests[tier] += 1

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.tests:
            return
        terminalreporter.section("time by tier")
        for tier in TIERS:
            if self.tests[tier]:
                terminalreporter.write_line(f"{tier:7s} {self.tests[tier]:4d} tests "
                                            f"{self.seconds[tier]:8.1f} s")
        terminalreporter.write_line(f"{'all':7s} {sum(self.tests.values()):4d} tests "
                                    f"{time.monotonic() - self.started:8.1f} s wall")
