"""``offramp testbed up|down|status``: an emulated Jetson cluster on one workstation.

Through the Docker Engine API (the ``docker`` SDK, so Docker or podman's compatible service,
whatever ``DOCKER_HOST`` points at) it starts a broker, the admission-controller, exit-arbiter
and priority-scheduler (the "gateway"), and one segment-worker container per emulated node,
each with the CPU quota and memory limit of its node profile. The scheduler then measures the
nodes and plans across them as it would across real boards.

What is emulated is CPU speed and memory, not the GPU: a profile's CPU quota (in workstation
cores) stands for the node's relative inference speed. Each profile notes NVIDIA's published
specification of the module it stands for; the quotas are rough ratios, good for rehearsing
placement and overload, not for predicting a board's frame rate.

The planning part (profiles, container specs, broker config) is pure and tested without an
engine; :class:`Testbed` is the thin part that talks to it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from offramp.errors import SettingsError
from offramp.local.system import bundle_env

LABEL = "io.offramp.testbed"
DEFAULT_NAME = "offramp-testbed"
Network = Literal["bridge", "host"]


@dataclass(frozen=True)
class NodeProfile:
    name: str
    cpus: float  # CPU quota on the workstation (nano_cpus / 1e9)
    memory: str  # memory limit (docker syntax)
    about: str  # the board it stands for

    @property
    def threads(self) -> int:
        return max(1, math.ceil(self.cpus))


PROFILES: Mapping[str, NodeProfile] = {p.name: p for p in (
    NodeProfile("nano", 0.5, "4g", "Jetson Nano 4GB: 4x Cortex-A57 1.43 GHz, 128-core Maxwell "
                                   "GPU (0.47 TFLOPS FP16), 4 GB LPDDR4"),
    NodeProfile("xavier-nx", 1.0, "8g", "Jetson Xavier NX: 6x Carmel 1.4 GHz, 384-core Volta "
                                        "GPU (21 TOPS), 8 GB LPDDR4x"),
    NodeProfile("orin-nano", 1.5, "8g", "Jetson Orin Nano 8GB: 6x Cortex-A78AE 1.5 GHz, "
                                        "1024-core Ampere GPU (40 TOPS), 8 GB LPDDR5"),
    NodeProfile("orin-nx", 2.0, "16g", "Jetson Orin NX 16GB: 8x Cortex-A78AE 2.0 GHz, "
                                       "1024-core Ampere GPU (100 TOPS), 16 GB LPDDR5"),
    NodeProfile("agx-orin", 4.0, "64g", "Jetson AGX Orin 64GB: 12x Cortex-A78AE 2.2 GHz, "
                                        "2048-core Ampere GPU (275 TOPS), 64 GB LPDDR5"),
)}

SERVICES = ("admission-controller", "exit-arbiter", "priority-scheduler")


def parse_nodes(spec: str) -> list[tuple[str, NodeProfile]]:
    """``"nano:2,orin-nano"`` -> ``[("nano-1", nano), ("nano-2", nano), ("orin-nano-1", ...)]``."""
    nodes: list[tuple[str, NodeProfile]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, count = part.partition(":")
        profile = PROFILES.get(name)
        if profile is None:
            raise SettingsError(f"testbed: unknown node profile {name!r}; known: "
                                f"{', '.join(PROFILES)}")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise SettingsError(f"testbed: {part!r}: the count after ':' must be a "
                                "whole number") from None
        if not 1 <= n <= 64:
            raise SettingsError(f"testbed: {part!r}: between 1 and 64 nodes per profile")
        first = sum(1 for node, p in nodes if p is profile) + 1
        nodes += [(f"{name}-{i}", profile) for i in range(first, first + n)]
    if not nodes:
        raise SettingsError("testbed: no nodes; e.g. --nodes nano:2,orin-nano")
    return nodes


@dataclass(frozen=True)
class TestbedSpec:
    __test__ = False  # not a pytest class, whatever its name

    name: str
    nodes: list[tuple[str, NodeProfile]]
    bundle: Path  # a bundle folder on the engine's host
    image_prefix: str = "offramp/"  # images <prefix><service>:<tag>
    image_tag: str = "latest"
    broker_image: str = "eclipse-mosquitto:2"
    network: Network = "bridge"
    port: int = 1883  # the broker, on the host's 127.0.0.1
    http_port: int = 18080  # host network: first of the services' HTTP ports
    prefix: str = "offramp/v1"

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").isalnum():
            raise SettingsError(f"testbed: name {self.name!r}: letters, digits and '-' only")
        if self.network not in ("bridge", "host"):
            raise SettingsError(f"testbed: network {self.network!r}: bridge or host")

    def image(self, service: str) -> str:
        return f"{self.image_prefix}{service}:{self.image_tag}"

    @property
    def broker_url(self) -> str:
        """Where clients on the host reach the broker."""
        return f"mqtt://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    role: str
    environment: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    nano_cpus: int | None = None
    mem_limit: str | None = None
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    ports: dict[str, tuple[str, int]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def mosquitto_conf(spec: TestbedSpec) -> str:
    """A private, anonymous broker: on the host's loopback (host network) or on the testbed's
    own network, published only on the host's 127.0.0.1 (bridge)."""
    listener = f"listener {spec.port} 127.0.0.1" if spec.network == "host" else \
        "listener 1883 0.0.0.0"
    return (f"# offramp testbed {spec.name}: a rehearsal broker, reachable from this host only\n"
            f"{listener}\nallow_anonymous true\npersistence false\nmax_packet_size 67108864\n"
            "max_queued_messages 10000\nmax_queued_bytes 268435456\nsys_interval 5\n"
            "set_tcp_nodelay false\n"
            "log_dest stdout\nlog_type error\nlog_type warning\n")


def containers(spec: TestbedSpec, conf_dir: Path) -> list[ContainerSpec]:
    """Every container of the testbed, broker first, in start order."""
    labels = {LABEL: spec.name}
    broker = f"{spec.name}-broker"
    inside = f"mqtt://127.0.0.1:{spec.port}" if spec.network == "host" else \
        f"mqtt://{broker}:1883"
    bundle = f"/bundles/{spec.bundle.name}"
    common = {"OFFRAMP_BROKER_URL": inside, "OFFRAMP_TOPIC_PREFIX": spec.prefix,
              "OFFRAMP_LOG_FORMAT": "json", **bundle_env(bundle)}
    mounts = {str(spec.bundle.resolve()): {"bind": bundle, "mode": "ro"}}
    out = [ContainerSpec(
        broker, spec.broker_image, "broker",
        command=["/usr/sbin/mosquitto", "-c", "/testbed/mosquitto.conf"],
        volumes={str(conf_dir.resolve()): {"bind": "/testbed", "mode": "ro"}},
        ports={} if spec.network == "host" else {"1883/tcp": ("127.0.0.1", spec.port)},
        labels={**labels, f"{LABEL}.role": "broker"})]
    port = spec.http_port
    gateway = [(svc, f"{svc.split('-')[0]}-1", None) for svc in SERVICES]
    workers = [("segment-worker", node, profile) for node, profile in spec.nodes]
    for service, node, profile in gateway + workers:
        env = {**common, "OFFRAMP_NODE": node,
               "OFFRAMP_HTTP_PORT": str(port if spec.network == "host" else 8080)}
        port += 1
        role = {**labels, f"{LABEL}.role": service}
        if profile is None:
            out.append(ContainerSpec(f"{spec.name}-{node}", spec.image(service), service, env,
                                     volumes=mounts, labels=role))
            continue
        env["OFFRAMP_WORKER_THREADS"] = str(profile.threads)
        out.append(ContainerSpec(
            f"{spec.name}-{node}", spec.image(service), service, env,
            nano_cpus=int(profile.cpus * 1e9), mem_limit=profile.memory, volumes=mounts,
            labels={**role, f"{LABEL}.profile": profile.name}))
    return out


class Testbed:
    """Starts, lists and removes a testbed's containers on a Docker-compatible engine."""

    __test__ = False

    def __init__(self, client: Any, state_root: Path | None = None) -> None:
        self.client = client
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.state_root = state_root or cache / "offramp" / "testbed"

    @classmethod
    def connect(cls, base_url: str | None = None) -> Testbed:
        try:
            import docker
        except ImportError:
            raise SettingsError("offramp testbed needs the docker SDK: pip install "
                                "'offramp[testbed]'") from None
        try:
            client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
            client.ping()
        except Exception as exc:  # the SDK raises several kinds; all mean "no engine there"
            where = base_url or os.environ.get("DOCKER_HOST") or "the default socket"
            raise SettingsError(f"testbed: no Docker-compatible engine at {where} ({exc}); "
                                "start Docker, or `podman system service` and set "
                                "DOCKER_HOST") from None
        return cls(client)

    def up(self, spec: TestbedSpec) -> list[ContainerSpec]:
        if self.containers(spec.name):
            raise SettingsError(f"testbed {spec.name!r} is already up; `offramp testbed down "
                                f"--name {spec.name}` first")
        if not (spec.bundle / "manifest.json").is_file():
            raise SettingsError(f"testbed: {spec.bundle} is not a model bundle (no manifest.json)")
        conf_dir = self.state_root / spec.name
        plan = containers(spec, conf_dir)
        missing = [img for img in sorted({c.image for c in plan}) if not self._has_image(img)]
        if missing:
            raise SettingsError(f"testbed: images not found on the engine: {', '.join(missing)} "
                                "(docker compose build, or make test-deploy, builds them)")
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "mosquitto.conf").write_text(mosquitto_conf(spec))
        (conf_dir / "mosquitto.conf").chmod(0o644)
        conf_dir.chmod(0o755)
        network: dict[str, str] = {"network_mode": "host"}
        if spec.network == "bridge":
            net = f"{spec.name}-net"
            if not self.client.networks.list(names=[net]):
                self.client.networks.create(net, labels={LABEL: spec.name})
            network = {"network": net}
        try:
            for c in plan:
                self.client.containers.run(
                    c.image, c.command, name=c.name, detach=True, environment=c.environment,
                    labels=c.labels, nano_cpus=c.nano_cpus, mem_limit=c.mem_limit,
                    volumes=c.volumes, ports=c.ports or None, **network)
        except Exception:
            self.down(spec.name)
            raise
        return plan

    def containers(self, name: str | None = None) -> list[Any]:
        label = f"{LABEL}={name}" if name else LABEL
        found: list[Any] = self.client.containers.list(all=True, filters={"label": label})
        return found

    def down(self, name: str, timeout_s: int = 30) -> int:
        """Stop (SIGTERM, then after ``timeout_s`` SIGKILL) and remove; returns how many."""
        found = self.containers(name)
        for c in sorted(found, key=lambda c: c.labels.get(f"{LABEL}.role") == "broker"):
            c.stop(timeout=timeout_s)  # services first, so they drain to a live broker
            c.remove(force=True)
        for net in self.client.networks.list(filters={"label": f"{LABEL}={name}"}):
            net.remove()
        shutil.rmtree(self.state_root / name, ignore_errors=True)
        return len(found)

    def status(self, name: str | None = None) -> list[dict[str, str]]:
        rows = []
        for c in self.containers(name):
            host = c.attrs.get("HostConfig", {})
            cpus = host.get("NanoCpus") or 0
            memory = host.get("Memory") or 0
            rows.append({"testbed": c.labels.get(LABEL, ""), "name": c.name, "status": c.status,
                         "role": c.labels.get(f"{LABEL}.role", ""),
                         "profile": c.labels.get(f"{LABEL}.profile", ""),
                         "cpus": f"{cpus / 1e9:g}" if cpus else "-",
                         "memory": f"{memory / 2**30:g}G" if memory else "-"})
        return rows

    def _has_image(self, image: str) -> bool:
        try:
            self.client.images.get(image)
        except Exception:  # docker.errors.ImageNotFound, or an engine-specific variant
            return False
        return True


def wait_until_serving(url: str, prefix: str, workers: int, timeout_s: float) -> float:
    """Block until ``workers`` workers heartbeat with segments; seconds it took."""
    import asyncio

    from offramp.bus import Bus, Topics
    from offramp.local.client import wait_for_workers
    from offramp.settings import BusSettings

    async def wait() -> None:
        async with Bus(BusSettings(broker_url=url, topic_prefix=prefix),
                       f"offramp-testbed-wait-{os.getpid()}") as bus:
            await wait_for_workers(bus, Topics(prefix), workers, timeout_s)

    t0 = time.monotonic()
    try:
        asyncio.run(wait())
    except TimeoutError:
        raise SettingsError(f"testbed: {workers} workers did not come up within {timeout_s:g} s "
                            "(`offramp testbed status`, and the containers' logs)") from None
    return time.monotonic() - t0


def render_status(rows: Iterable[Mapping[str, str]]) -> Sequence[str]:
    cols = ("testbed", "name", "role", "profile", "cpus", "memory", "status")
    table = [cols] + [tuple(r[c] or "-" for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in table]
