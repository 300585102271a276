"""The whole system running on a rehearsal network (:mod:`offramp.local.netbed`): the broker
and the gateway services in the gateway's namespace, each segment-worker in its own, or, for
the source's own box (MDI-Exit's source computes the first layers itself), in the gateway's.
Used by ``offramp netbed up`` and ``make bench-links``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from offramp.local.broker import LocalBroker
from offramp.local.launcher import ProcessGroup
from offramp.local.netbed import Plan, create, netns_exec, remove
from offramp.local.system import bundle_env, split_segments
from offramp.model.bundle import Bundle

PORT = 1883


@dataclass
class Running:
    plan: Plan
    broker: LocalBroker
    group: ProcessGroup
    assignment: dict[str, tuple[int, ...]]  # worker -> the segments it hosts


@contextlib.contextmanager
def running(plan: Plan, bundle: Bundle, logdir: Path, *, prefix: str = "offramp/v1",
            assignment: Sequence[tuple[int, ...]] | None = None, on_gateway: int = 0,
            env: Mapping[str, str] | None = None,
            worker_env: Mapping[str, str] | None = None) -> Iterator[Running]:
    """Make ``plan``'s network, start the system in it, and on the way out stop everything
    and remove the network. ``assignment``: the segments of each worker (default: split by
    FLOPs over all of them); the first ``on_gateway`` workers run in the gateway's namespace
    (``gw-1``, ...), the others in the plan's worker namespaces (``worker-1``, ...)."""
    workers = plan.workers + on_gateway
    groups = list(assignment) if assignment is not None else split_segments(
        [s.flops for s in bundle.manifest.segments], workers)
    if len(groups) != workers:
        raise ValueError(f"{len(groups)} segment groups for {workers} workers")
    create(plan)
    gw = netns_exec(plan.gateway.namespace)
    group: ProcessGroup | None = None
    broker = LocalBroker(PORT, host=plan.broker_address, wrap=gw, persistence=True,
                         workdir=logdir)
    try:
        broker.start()
        root = str(bundle.root.resolve())
        group = ProcessGroup(logdir, {
            "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix,
            "OFFRAMP_LOG_FORMAT": "json", **bundle_env(root), **(env or {})})
        group.add("exit-arbiter", "arbiter-1", wrap=gw)
        group.add("priority-scheduler", "scheduler-1", wrap=gw)
        places = [(f"gw-{i + 1}", gw) for i in range(on_gateway)] + [
            (node.name, netns_exec(node.namespace)) for node in plan.worker_nodes]
        hosted = {}
        for (name, wrap), segs in zip(places, groups, strict=True):
            group.add("segment-worker", name,
                      {**(worker_env or {}), "OFFRAMP_WORKER_SEGMENTS": ",".join(map(str, segs))},
                      wrap=wrap)
            hosted[name] = segs
        group.add("admission-controller", "admission-1", wrap=gw)
        yield Running(plan, broker, group, hosted)
    finally:
        if group is not None:
            group.stop()
        broker.close()
        remove(plan.name)
