"""What tests share when pytest-xdist runs them on several workers (``make test`` does).

- **The machine.** A test marked ``exclusive`` measures time, a rate or a load, so it runs with
  nothing beside it: it waits for the tests running on other workers to finish, and they wait
  for it. Every other test shares the machine. One lock file taken shared or exclusive does it.
  Every holder passes a second lock, the gate, first, and an exclusive one keeps the gate while
  it waits, so that tests asking to share cannot overtake it for ever.
- **Files built once.** ``shared_dir`` is one folder for every worker of a run (the session's
  own base folder without xdist), for what is built once and read by all, under a lock.
- **Cores.** Each worker's training and its subprocesses get their share of the cores
  (``OMP_NUM_THREADS``): two torch processes that each spin on every core run several times
  slower than one after the other.
- **Ports.** ``port_base`` moves a fixed port range per worker, so that two workers looking for
  free ports from the same place do not both find the same ones.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def worker_index() -> int:
    """0 without xdist; n for xdist's worker ``gwn``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


def share_cores() -> None:
    """Under xdist, limits this worker (torch here, and the processes it starts through the
    environment) to its share of the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def port_base(start: int) -> int:
    """``start`` moved by 1,000 per xdist worker."""
    return start + 1000 * worker_index()


def shared_dir(factory: pytest.TempPathFactory) -> Path:
    """A folder that every xdist worker of this run sees (each worker's base temp is a folder
    of the run's base temp)."""
    base = factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextmanager
def hold(root: Path, exclusive: bool) -> Iterator[None]:
    """Holds the machine whose lock files are in ``root``: alone, or shared with others."""
    with open(root / "machine.gate", "a") as gate, open(root / "machine.lock", "a") as machine:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


class Machine:
    """Holds the machine shared or alone around each test's set-up, call and tear-down. The
    process that starts the run (xdist's controller, or the only one) makes the lock folder
    and names it to the workers it starts in ``OFFRAMP_TESTS_MACHINE``; it removes it at the
    end."""

    VARIABLE = "OFFRAMP_TESTS_MACHINE"

    def __init__(self) -> None:
        self.made: Path | None = None
        if self.VARIABLE not in os.environ:  # the run's first process: workers inherit it
            self.made = Path(tempfile.mkdtemp(prefix="offramp-tests-"))
            os.environ[self.VARIABLE] = str(self.made)
        self.root = Path(os.environ[self.VARIABLE])

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None]:
        with hold(self.root, item.get_closest_marker("exclusive") is not None):
            yield

    def pytest_unconfigure(self) -> None:
        if self.made is not None:
            os.environ.pop(self.VARIABLE, None)
            shutil.rmtree(self.made, ignore_errors=True)
