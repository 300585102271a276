"""A private Mosquitto for local runs and tests: free port, generated config, clean stop.

``offramp`` starts one when ``OFFRAMP_BROKER_URL`` is empty. It listens on 127.0.0.1 only,
with anonymous access (it is reachable from this machine alone) and explicit packet limits.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from offramp.errors import BrokerError

INSTALL_HINT = (
    "the 'mosquitto' broker is not installed. Install it with:\n"
    "  Debian/Ubuntu:  sudo apt-get install -y mosquitto mosquitto-clients\n"
    "  Fedora:         sudo dnf install -y mosquitto\n"
    "  macOS:          brew install mosquitto\n"
    "or point OFFRAMP_BROKER_URL at a running broker (mqtt://host:1883)."
)

# Runs mosquitto in place of itself after asking the kernel for SIGTERM when its parent
# thread ends (PR_SET_PDEATHSIG, kept across exec), and gives up if that parent is already gone.
_WITH_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (also looked for in /usr/sbin), or BrokerError with a hint."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise BrokerError(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_run(count: int, start: int) -> int:
    """The first port from ``start`` up where ``count`` consecutive ports are free (on
    127.0.0.1 and on every address, as a service listening on 0.0.0.0 binds)."""
    base = start
    while base + count < 65536:
        taken = next((port for port in range(base, base + count) if not _free(port)), None)
        if taken is None:
            return base
        base = taken + 1
    raise OSError(f"no {count} consecutive free ports from {start}")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def render_config(port: int, *, max_packet_bytes: int = 64 * 1024 * 1024,
                  persistence_dir: Path | None = None, extra: str = "",
                  host: str = "127.0.0.1") -> str:
    """The generated mosquitto.conf of a private broker (persistence keeps retained messages
    and sessions across a restart)."""
    persistence = (["persistence true", f"persistence_location {persistence_dir}/"]
                   if persistence_dir is not None else ["persistence false"])
    return "\n".join([
        f"listener {port} {host}",
        # Started as root, mosquitto would switch to user 'mosquitto', who cannot write our
        # temporary directory; run as whoever started it (ignored when not root).
        f"user {getpass.getuser()}",
        "allow_anonymous true",
        *persistence,
        f"max_packet_size {max_packet_bytes}",
        "max_inflight_messages 100",
        "max_queued_messages 10000",  # per client; beyond it (or the bytes), the broker drops
        "max_queued_bytes 268435456",
        "sys_interval 5",
        "max_keepalive 3600",
        "set_tcp_nodelay false",  # Nagle on, as in compose/mosquitto.conf (README says why)
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages false",
        extra,
        "",
    ])


class LocalBroker:
    """A Mosquitto child process. ``stop()`` and ``start()`` again keep the same port."""

    def __init__(self, port: int | None = None, *, max_packet_bytes: int = 64 * 1024 * 1024,
                 persistence: bool = False, extra_config: str = "",
                 workdir: Path | None = None, host: str = "127.0.0.1",
                 wrap: Sequence[str] = ()) -> None:
        """``host``: the address it listens on (and is reached at); ``wrap``: a command prefix
        that runs it elsewhere, e.g. ``ip netns exec NS``."""
        self.binary = find_mosquitto()
        self.host = host
        self.wrap = list(wrap)
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="offramp-broker-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.config_path.write_text(render_config(
            self.port, max_packet_bytes=max_packet_bytes,
            persistence_dir=workdir if persistence else None, extra=extra_config, host=host))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The broker's process id (0 when it is not running), for its CPU time."""
        return self._proc.pid if self._proc is not None and self.running else 0

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        log = self.log_path.open("ab")
        command = [*self.wrap, self.binary, "-c", str(self.config_path)]
        # A broker left behind by a killed `offramp up` would keep taking frames on its port
        # that nobody answers. The kernel's parent-death signal follows the *thread* that
        # forked, so it is asked for only from the main thread, which ends with the process.
        if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            command = [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *command]
        self._proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode} at start; "
                                  f"its log says: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                (self.host, self.port), timeout=0.2
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut: what it held in memory and had not saved yet
        (``autosave_interval``) is gone. ``start()`` brings it back on the same port."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
