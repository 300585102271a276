"""Start offramp services as child processes (``offramp up``, ``make demo``, tests) and stop them.

Each child gets the parent's environment plus its own ``OFFRAMP_*`` variables, writes its log
lines to a file, and is stopped with SIGTERM (then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from offramp.local.services import service_modules


def interrupt_on_stop_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, also when SIGINT was
    inherited as ignored (a script's background job): a command that owns services (``offramp
    up``, ``offramp demo``) then stops them on its way out rather than leaving them running."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


@dataclass
class ServiceProcess:
    service: str
    node: str
    env: dict[str, str]
    log_path: Path
    wrap: tuple[str, ...] = ()  # a command prefix, e.g. ("ip", "netns", "exec", "NS")
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _lifeline: int | None = field(default=None, repr=False)  # the write end this parent holds

    def start(self) -> None:
        modules = service_modules()
        if self.service not in modules:
            raise ValueError(f"unknown service {self.service!r}; installed: "
                             f"{', '.join(modules) or 'none (pip install services/<name>)'}")
        self._release()
        self._log = self.log_path.open("ab")
        # The child holds the read end of a pipe whose write end only this process holds: when
        # this process dies, however (SIGKILL too), the child reads end of file and stops.
        child_end, self._lifeline = os.pipe()
        env = {**os.environ, **self.env, "OFFRAMP_NODE": self.node, "PYTHONUNBUFFERED": "1",
               "PYTHONFAULTHANDLER": "1",  # SIGABRT dumps every thread's stack to its log
               "OFFRAMP_LIFELINE_FD": str(child_end)}
        # A session of its own: a Ctrl-C in the terminal reaches only the parent, which then
        # stops each service once with SIGTERM (a second signal would land after the
        # service's handler is gone and kill it mid-drain).
        try:
            self.proc = subprocess.Popen([*self.wrap, sys.executable, "-m", modules[self.service]],
                                         env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         pass_fds=(child_end,))
        finally:
            os.close(child_end)

    def _release(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self._release()

    def stop(self, grace_s: float = 10.0, *, signalled: bool = False) -> int | None:
        """SIGTERM (unless ``signalled`` already), wait up to ``grace_s``, then SIGKILL; return
        the exit code. A second SIGTERM could land after the service removed its handler."""
        if self.proc is None:
            return None
        if not signalled:
            self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGABRT)  # stuck: leave its stacks in the log, then kill it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0)
            self.proc.kill()
            code = self.proc.wait()
        self._release()
        return code


class ProcessGroup:
    """Several service processes started together and stopped in reverse order."""

    def __init__(self, logdir: Path, env: Mapping[str, str],
                 http_port: Callable[[int], int] = lambda index: 0) -> None:
        self.logdir = logdir
        self.env = dict(env)
        self.http_port = http_port  # the n-th member's OFFRAMP_HTTP_PORT (0: no HTTP server)
        self.members: list[ServiceProcess] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def add(self, service: str, node: str, env: Mapping[str, str] | None = None,
            wrap: tuple[str, ...] = ()) -> ServiceProcess:
        # never this process's own OFFRAMP_HTTP_PORT: every member on one port would fail
        port = {"OFFRAMP_HTTP_PORT": str(self.http_port(len(self.members))
                                         or self.env.get("OFFRAMP_HTTP_PORT", 0))}
        member = ServiceProcess(service, node, {**self.env, **port, **(env or {})},
                                self.logdir / f"{node}.log", wrap)
        member.start()
        self.members.append(member)
        return member

    def stop(self, grace_s: float = 25.0) -> dict[str, int | None]:
        """Grace outlasts a worker's longest default stop (0.75 s of intake, 10 s of drain,
        then its last reports, offline heartbeat and disconnect): a parent that kills at the
        moment the child gives up draining turns a clean exit into SIGKILL."""
        codes: dict[str, int | None] = {}
        for member in reversed(self.members):
            member.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for member in reversed(self.members):
            codes[member.node] = member.stop(max(0.1, deadline - time.monotonic()),
                                             signalled=True)
        return codes

    def exited(self) -> list[tuple[str, int | None]]:
        """``(node, exit code)`` of the members that are no longer running."""
        return [(m.node, m.proc.returncode if m.proc else None)
                for m in self.members if not m.alive]
