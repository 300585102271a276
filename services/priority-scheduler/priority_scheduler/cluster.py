"""The scheduler's view of the cluster: nodes from worker heartbeats and wills (speed, memory,
hosted segments, backlog per priority, link), sources from the registry and from the rates the
admission-controllers observe. Pure apart from the clock passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from offramp.node.peers import PeerTable
from offramp.node.sources import SourceRegistry
from offramp.policy.plan import NodeInfo, SourceLoad
from offramp.wire import Heartbeat


@dataclass
class _Observed:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time, arrivals so far)

    def add(self, now: float, count: float) -> None:
        self.samples = [s for s in self.samples if now - s[0] <= 5.0] + [(now, count)]

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return max(0.0, (c1 - c0) / (t1 - t0)) if t1 > t0 else 0.0


class ClusterView:
    def __init__(self, model: str, registry: SourceRegistry, stale_after_s: float) -> None:
        self.model = model
        self.registry = registry
        self.stale_after_s = stale_after_s
        self.workers = PeerTable("")
        self._observed: dict[tuple[str, str], _Observed] = {}

    def update(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True when a worker went offline (will or clean stop)."""
        if hb.role == "admission":
            said = set()
            for source, value in hb.arrivals.items():
                said.add((hb.node, source))
                self._observed.setdefault((hb.node, source), _Observed()).add(now, value)
            # the sources a controller no longer reports (idle, or out of its most active):
            # bounded by what the heartbeats say now, not by every source ever seen
            for gone in [k for k in self._observed if k[0] == hb.node and k not in said]:
                del self._observed[gone]
            return False
        return self.workers.update(hb, now)

    def live(self, now: float) -> list[str]:
        """Workers heard from recently that have said what they can host (a worker still
        loading its model heartbeats without it, and is not planned for yet)."""
        out = []
        for n in self.workers.nodes("worker"):
            hb = self.workers.heartbeat(n)
            if hb is None or self.workers.age(n, now) > self.stale_after_s:
                continue
            if any(r.model == self.model for r in hb.loadable) or \
                    any(s.model == self.model for s in hb.segments):
                out.append(n)
        return out

    def nodes(self, now: float) -> list[NodeInfo]:
        out = []
        for node in self.live(now):
            hb = self.workers.heartbeat(node)
            assert hb is not None
            loadable = frozenset(r.segment for r in hb.loadable if r.model == self.model) or \
                frozenset(s.segment for s in hb.segments if s.model == self.model)
            out.append(NodeInfo(node, _quantise(hb.flops_per_s), loadable, hb.max_segments, hb.link_bps,
                                hb.link_rtt_s))
        return out

    def backlog(self, node: str) -> float:
        hb = self.workers.heartbeat(node)
        return sum(s.backlog_s for s in hb.segments) if hb else 0.0

    def hosted(self, node: str) -> set[int]:
        hb = self.workers.heartbeat(node)
        return {s.segment for s in hb.segments if s.model == self.model} if hb else set()

    def sources(self) -> list[SourceLoad]:
        observed: dict[str, float] = {}
        for (_, source), obs in self._observed.items():
            observed[source] = observed.get(source, 0.0) + obs.rate()
        names = set(self.registry.known()) | {s for s, r in observed.items() if r > 0}
        out = []
        for name in sorted(names):
            spec = self.registry.lookup(name)
            if spec is None:
                continue
            rate = max(self.registry.expected_rate(name), observed.get(name, 0.0))
            out.append(SourceLoad(name, spec.priority, rate))
        if not out:  # nothing known yet: plan for one default source
            out.append(SourceLoad("*", self.registry.settings.default_priority,
                                  self.registry.settings.default_rate_hz))
        return out


def _quantise(flops: float) -> float:
    """Measured speeds jitter; the plan sees them in steps of sqrt(2), so that noise does not
    flip it between near-equal nodes (emulated 1x/2x/4x nodes stay apart)."""
    if flops <= 0:
        return 0.0
    return float(2 ** (round(2 * math.log2(flops)) / 2))
