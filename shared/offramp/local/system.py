"""Run the whole system locally as separate processes: ``offramp up``, ``make demo``, the
end-to-end tests and the pipeline benchmark all start it through :class:`LocalSystem`."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from offramp.local.broker import LocalBroker
from offramp.local.launcher import ProcessGroup, ServiceProcess
from offramp.model.bundle import Bundle
from offramp.node.cpushare import NICEST


def bundle_env(root: str) -> dict[str, str]:
    """Every service's bundle setting, naming the bundle at ``root``."""
    return {f"OFFRAMP_{role}_BUNDLE": root for role in ("ADMISSION", "WORKER", "ARBITER",
                                                        "SCHEDULER")}


def split_segments(flops: list[int], workers: int) -> list[tuple[int, ...]]:
    """Contiguous groups of segments (1-based), one per worker, balanced by FLOPs. With more
    workers than segments, the extra workers host copies of the heaviest groups."""
    k = len(flops)
    if workers <= 0:
        return []
    groups = min(workers, k)
    target = sum(flops) / groups
    out: list[list[int]] = [[]]
    acc = 0.0
    for i, f in enumerate(flops, start=1):
        remaining_segments = k - i + 1
        remaining_groups = groups - len(out) + 1
        if out[-1] and (acc + f / 2 > target or remaining_segments < remaining_groups) \
                and len(out) < groups:
            out.append([])
            acc = 0.0
        out[-1].append(i)
        acc += f
    result = [tuple(g) for g in out]
    by_weight = sorted(result, key=lambda g: -sum(flops[s - 1] for s in g))
    while len(result) < workers:
        result.append(by_weight[(len(result) - groups) % groups])
    return result


def stage_nices(assignment: list[tuple[int, ...]], step: int) -> list[int]:
    """Nice value per worker of ``assignment`` on shared cores: ``step`` per pipeline stage
    between the worker's last segment and the model's end, so that a stage yields the CPU to
    the ones after it (:mod:`offramp.node.cpushare`). Copies of a stage get the same value."""
    stages = sorted({max(a) for a in assignment if a})
    return [min(NICEST, step * (len(stages) - 1 - stages.index(max(a)))) if a else 0
            for a in assignment]


@dataclass
class LocalSystem:
    """Broker (unless ``broker_url`` is given), admission-controller (and its standby),
    exit-arbiter, priority-scheduler and ``workers`` segment-workers splitting ``bundle``."""

    bundle: Bundle
    workers: int = 2
    broker_url: str = ""
    prefix: str = "offramp/v1"
    env: Mapping[str, str] = field(default_factory=dict)
    worker_env: Mapping[str, str] = field(default_factory=dict)
    logdir: Path | None = None
    stage_nice: int = 2  # nice per stage a worker is from the last (see OFFRAMP_WORKER_NICE)
    standby: bool = False  # a second admission-controller, admission-2, standing by
    # first port of the services' /livez, /readyz and /metrics, one each in start order
    # (0: none; OFFRAMP_HTTP_PORT in this process's environment is never passed on as it is,
    # since every service listening on one port would fail)
    http_base: int = 0
    broker: LocalBroker | None = None
    group: ProcessGroup | None = None
    assignment: list[tuple[int, ...]] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.broker_url or (self.broker.url if self.broker else "")

    def base_env(self) -> dict[str, str]:
        return {"OFFRAMP_BROKER_URL": self.url, "OFFRAMP_TOPIC_PREFIX": self.prefix,
                "OFFRAMP_LOG_FORMAT": "json", **bundle_env(str(self.bundle.root)), **self.env}

    def start(self) -> None:
        if self.logdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="offramp-up-")
            self.logdir = Path(self._tmp.name)
        if not self.broker_url:
            self.broker = LocalBroker(persistence=True)
            self.broker.start()
        self.group = ProcessGroup(self.logdir, self.base_env(), http_port=self.http_port)
        self.assignment = split_segments([s.flops for s in self.bundle.manifest.segments],
                                         self.workers)
        self.group.add("exit-arbiter", "arbiter-1")
        self.group.add("priority-scheduler", "scheduler-1")
        nices = stage_nices(self.assignment, self.stage_nice)
        for i, segments in enumerate(self.assignment):
            self.add_worker(f"worker-{i + 1}", segments,
                            {"OFFRAMP_WORKER_NICE": str(nices[i])}
                            if "OFFRAMP_WORKER_NICE" not in self.worker_env else None)
        self.group.add("admission-controller", "admission-1")
        if self.standby:
            self.group.add("admission-controller", "admission-2",
                           {"OFFRAMP_ADMISSION_STANDBY": "true"})

    def add_worker(self, node: str, segments: tuple[int, ...],
                   env: Mapping[str, str] | None = None) -> ServiceProcess:
        assert self.group is not None
        extra = {**self.worker_env, "OFFRAMP_WORKER_SEGMENTS": ",".join(map(str, segments)),
                 **(env or {})}
        return self.group.add("segment-worker", node, extra)

    def http_port(self, index: int) -> int:
        """The HTTP port of the ``index``-th service started (0: none)."""
        return self.http_base + index if self.http_base else 0

    def http_ports(self) -> dict[str, int]:
        """``{node: port}`` of the services' HTTP servers (empty when there are none)."""
        if self.group is None or not self.http_base:
            return {}
        return {m.node: int(m.env["OFFRAMP_HTTP_PORT"]) for m in self.group.members}

    def exited(self) -> list[tuple[str, int | None]]:
        """The services that stopped by themselves: (node, exit code)."""
        return self.group.exited() if self.group is not None else []

    def member(self, node: str) -> ServiceProcess:
        assert self.group is not None
        return next(m for m in self.group.members if m.node == node)

    def stop(self) -> dict[str, int | None]:
        codes = self.group.stop() if self.group else {}
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return codes

    def logs(self, tail: int = 4000) -> str:
        if self.logdir is None:
            return ""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.logdir.glob("*.log")))
