"""How xdist workers share the machine (tests/sharing.py): an exclusive test runs alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sharing import hold, port_base

pytestmark = pytest.mark.tier("pure")


def _order(tmp_path: Path, first: bool, second: bool) -> list[str]:
    """Thread one holds the machine (exclusively or not) until thread two has asked for it;
    says in which order they were in and out."""
    said: list[str] = []
    one_in, two_asking = threading.Event(), threading.Event()

    def one() -> None:
        with hold(tmp_path, first):
            said.append("one in")
            one_in.set()
            two_asking.wait(5)
            time.sleep(0.2)  # thread two is now waiting, or already in beside it
            said.append("one out")

    def two() -> None:
        one_in.wait(5)
        two_asking.set()
        with hold(tmp_path, second):
            said.append("two in")

    threads = [threading.Thread(target=one), threading.Thread(target=two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return said


def test_shared_holders_run_together_and_an_exclusive_one_alone(tmp_path: Path) -> None:
    assert _order(tmp_path, False, False) == ["one in", "two in", "one out"]
    assert _order(tmp_path, True, False) == ["one in", "one out", "two in"]
    assert _order(tmp_path, False, True) == ["one in", "one out", "two in"]


def test_each_worker_looks_for_ports_in_a_range_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert port_base(19500) == 19500
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    assert port_base(19500) == 21500
