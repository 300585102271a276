"""``offramp netbed up|down|status``: a rehearsal network made of the kernel's own parts.

The broker and the gateway services (admission-controller, exit-arbiter, priority-scheduler)
run in one network namespace, each segment-worker in its own; every namespace is joined to a
bridge (in a namespace of its own, so the host's network is not touched) by a veth pair whose
two ends are shaped with a token-bucket filter (``tbf``) to a link profile, so each link is
limited in both directions. One more veth pair, unshaped, joins the host to the bridge at
``<subnet>.254``: cameras and ``offramp publish`` on the host reach the broker at
``<subnet>.1``.

What it does not emulate: delay and loss (this kernel has no ``netem``; a worker's in-process
``OFFRAMP_WORKER_LINK_DELAY_MS`` adds delay), radio contention, and anything about real
boards. It needs root (``CAP_NET_ADMIN``) and the ``ip`` and ``tc`` commands; where they are
missing it fails saying so. ``down`` removes every namespace (and with it every link and
qdisc) whose name starts with the netbed's name, and every process in them, also after
``up`` was killed.

The plan (names, addresses, the commands) is pure and tested without root;
:class:`Netbed` runs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from offramp.errors import OfframpError

PROFILES = {"gbe": 1000.0, "fe": 100.0, "wifi": 20.0}  # Mbit/s
DEFAULT_NAME = "ofn"
DEFAULT_SUBNET = "10.77.0"
BRIDGE = "br0"
BURST_S = 0.01  # tbf bucket: 10 ms at the rate (at least 32 KiB: one TSO segment passes)
QUEUE_S = 0.05  # tbf queue: 50 ms at the rate, then drops (a shaped link's buffer)
MAX_NAME = 6  # interface names are at most 15 bytes: "<name>-h<node>" must fit


class NetbedError(OfframpError):
    """A rehearsal network that cannot be made here, or a wrong setting."""


def parse_rate(text: str) -> float:
    """A profile name (gbe, fe, wifi) or a rate in Mbit/s."""
    if text in PROFILES:
        return PROFILES[text]
    try:
        value = float(text)
    except ValueError:
        raise NetbedError(f"link {text!r}: a profile ({', '.join(PROFILES)}) or Mbit/s") from None
    if not 0.1 <= value <= 100_000:
        raise NetbedError(f"link {text!r}: between 0.1 and 100000 Mbit/s")
    return value


def tbf(dev: str, mbps: float) -> list[str]:
    """The tc command that shapes ``dev``'s egress to ``mbps``."""
    rate_bytes = mbps * 1e6 / 8
    burst = max(int(rate_bytes * BURST_S), 32 * 1024)
    limit = max(int(rate_bytes * QUEUE_S), 2 * burst)
    return ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbps}mbit",
            "burst", str(burst), "limit", str(limit)]


@dataclass(frozen=True)
class Node:
    role: str  # "gateway" or "worker"
    namespace: str
    address: str
    hub_link: str  # the veth end on the bridge
    name: str  # OFFRAMP_NODE of what runs there (the gateway: its namespace's short name)


@dataclass(frozen=True)
class Plan:
    name: str = DEFAULT_NAME
    workers: int = 3
    mbps: float = PROFILES["wifi"]
    subnet: str = DEFAULT_SUBNET  # the first three octets of a /24

    def __post_init__(self) -> None:
        if not self.name.isalnum() or not 1 <= len(self.name) <= MAX_NAME:
            raise NetbedError(f"netbed name {self.name!r}: 1 to {MAX_NAME} letters or digits "
                              "(interface names are short)")
        if not 1 <= self.workers <= 50:
            raise NetbedError(f"workers: 1 to 50, got {self.workers}")
        parts = self.subnet.split(".")
        if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise NetbedError(f"subnet {self.subnet!r}: three octets, e.g. {DEFAULT_SUBNET}")

    @property
    def hub(self) -> str:
        return f"{self.name}-hub"

    @property
    def host_link(self) -> str:
        return f"{self.name}-host"

    @property
    def broker_address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def gateway(self) -> Node:
        return Node("gateway", f"{self.name}-gw", f"{self.subnet}.1", f"{self.name}-hgw",
                    "gateway")

    @property
    def worker_nodes(self) -> list[Node]:
        return [Node("worker", f"{self.name}-w{i}", f"{self.subnet}.{10 + i}",
                     f"{self.name}-hw{i}", f"worker-{i}") for i in range(1, self.workers + 1)]

    @property
    def nodes(self) -> list[Node]:
        return [self.gateway, *self.worker_nodes]

    def namespaces(self) -> list[str]:
        return [self.hub, *(n.namespace for n in self.nodes)]

    def commands(self) -> list[list[str]]:
        """Every command that builds the network, in order (each namespace is made before
        anything in it, so a crash part-way leaves only things ``down`` finds by name)."""
        hub = ["ip", "netns", "exec", self.hub]
        cmds = [["ip", "netns", "add", self.hub], [*hub, "ip", "link", "set", "lo", "up"],
                [*hub, "ip", "link", "add", BRIDGE, "type", "bridge"],
                [*hub, "ip", "link", "set", BRIDGE, "up"]]
        for node in self.nodes:
            inside = ["ip", "netns", "exec", node.namespace]
            cmds += [
                ["ip", "netns", "add", node.namespace],
                [*inside, "ip", "link", "set", "lo", "up"],
                [*hub, "ip", "link", "add", node.hub_link, "type", "veth", "peer", "name", "eth0",
                 "netns", node.namespace],
                [*hub, "ip", "link", "set", node.hub_link, "master", BRIDGE, "up"],
                [*inside, "ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
                [*inside, "ip", "link", "set", "eth0", "up"],
                [*hub, *tbf(node.hub_link, self.mbps)],  # towards the node
                [*inside, *tbf("eth0", self.mbps)],  # from the node
            ]
        cmds += [
            ["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "host",
             "netns", self.hub],
            [*hub, "ip", "link", "set", "host", "master", BRIDGE, "up"],
            ["ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.host_link],
            ["ip", "link", "set", self.host_link, "up"],
        ]
        return cmds


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetbedError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def check_host() -> None:
    """Root and the tools, or one error saying which is missing."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None
               and not Path(f"/usr/sbin/{tool}").exists() and not Path(f"/sbin/{tool}").exists()]
    if missing:
        raise NetbedError(f"the rehearsal network needs {' and '.join(missing)} "
                          "(Debian: apt-get install iproute2)")
    if os.geteuid() != 0:
        raise NetbedError("the rehearsal network needs root (network namespaces and qdiscs "
                          "need CAP_NET_ADMIN): run it with sudo")


def existing(name: str) -> list[str]:
    """Namespaces that belong to the netbed ``name``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    found = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(ns for ns in found if ns.startswith(f"{name}-"))


def create(plan: Plan) -> None:
    """Build the network; on a failure, remove what was made and raise."""
    check_host()
    if existing(plan.name):
        raise NetbedError(f"a netbed named {plan.name} exists: offramp netbed down --name "
                          f"{plan.name} first")
    try:
        for cmd in plan.commands():
            _run(cmd)
    except NetbedError:
        remove(plan.name)
        raise


def remove(name: str, grace_s: float = 5.0) -> list[str]:
    """Stop every process in the netbed's namespaces (SIGTERM, then SIGKILL), delete the
    namespaces (their links and qdiscs go with them) and the host's link. Returns what it
    removed."""
    namespaces = existing(name)
    pids: set[int] = set()
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             check=False).stdout
        pids |= {int(p) for p in out.split() if p.isdigit()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()
                    and "zombie" not in _state(p)}
            time.sleep(0.05)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    host = f"{name}-host"
    if Path(f"/sys/class/net/{host}").exists():
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)
    return namespaces


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def netns_exec(namespace: str) -> tuple[str, ...]:
    """The command prefix that runs a program in ``namespace`` (``ip`` by its full path: a
    prefix may be handed to ``execv``)."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "/usr/sbin/ip"
    return (ip, "netns", "exec", namespace)
