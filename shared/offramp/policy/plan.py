"""The allocation plan (docs/algorithms.md 3.4, after PA-MDI), pure.

Sources are placed one at a time in priority order (then by name). For a source m with rate
lambda_m, a chain partition of the model's segments over the nodes is found by dynamic
programming over (segment, node): the cost of running segment k on node n is the share of the
source's samples that reach k, r_k, times the time there,

    wait_kn = s_kn / (1 - rho_n - lambda_m r_k s_kn)          (s_kn = F_k / F_n)

(an M/M/1 sojourn with the load rho_n already committed to n by higher-priority sources), plus
r_k times the transfer from the node of segment k-1 (round trip + bytes / link rate, 0 on the
same node). The route that minimises the source's expected latency is committed: its load
joins rho and its segments join the nodes' hosted sets (within each node's loadable segments
and its maximum number of segments). Minimising each source's latency in priority order is a
greedy for ``sum_m gamma_m latency_m``: a more important source is never worse off because of
a less important one.

Plans are sticky: a segment costs ``1 - stickiness`` times as much on a node that hosts it in
the plan in force, so that measurement noise between near-equal nodes does not make the
workers load and unload segments back and forth.

A segment no route uses still gets the fastest node that can take it, so that every segment
has a host. Routes alone would leave a node that no route uses idle, and put all of one
source's segments on one node (a chain costs no transfers): the copies that let per-task
placement share the work come after, from :mod:`offramp.policy.replicas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from offramp.policy.replicas import add_copies

SATURATED = 0.05  # least spare capacity assumed, so an overloaded node costs a lot, not inf


@dataclass(frozen=True)
class NodeInfo:
    node: str
    flops_per_s: float
    loadable: frozenset[int]
    max_segments: int = 0  # 0: no limit
    link_bps: float = 0.0  # bytes/s; 0: unknown (transfer counted as rtt only)
    rtt_s: float = 0.0


@dataclass(frozen=True)
class SourceLoad:
    source: str
    priority: float
    rate_hz: float


@dataclass(frozen=True)
class ModelInfo:
    model: str
    flops: Sequence[int]  # per segment
    out_bytes: Sequence[int]  # activation bytes per sample leaving each segment
    reach: Sequence[float]  # share of samples that reach each segment (1.0 for the first)


@dataclass
class Allocation:
    nodes: dict[str, set[int]] = field(default_factory=dict)
    routes: dict[str, dict[int, str]] = field(default_factory=dict)
    expected_s: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)  # committed utilisation per node


def _speed(n: NodeInfo, nodes: Sequence[NodeInfo]) -> float:
    if n.flops_per_s > 0:
        return n.flops_per_s
    known = [m.flops_per_s for m in nodes if m.flops_per_s > 0]
    return sum(known) / len(known) if known else 1e9


def _can_host(n: NodeInfo, k: int, alloc: Allocation) -> bool:
    hosted = alloc.nodes[n.node]
    return k in n.loadable and (k in hosted or n.max_segments == 0
                                or len(hosted) < n.max_segments)


def plan(model: ModelInfo, nodes: Sequence[NodeInfo], sources: Sequence[SourceLoad], *,
         current: dict[str, set[int]] | None = None, stickiness: float = 0.2) -> Allocation:
    alloc = Allocation({n.node: set() for n in nodes}, load={n.node: 0.0 for n in nodes})
    if not nodes:
        return alloc
    speeds = {n.node: _speed(n, nodes) for n in nodes}
    keep = {(node, k): 1.0 - stickiness for node, segs in (current or {}).items() for k in segs}
    for src in sorted(sources, key=lambda s: (-s.priority, s.source)):
        route, cost = _route(model, nodes, speeds, src, alloc, keep)
        if route is not None and not _fits(route, nodes, alloc):
            route, cost = _greedy(model, nodes, speeds, src, alloc)
        if route is None:
            continue
        alloc.routes[src.source] = route
        alloc.expected_s[src.source] = cost
        for k, node in route.items():
            alloc.nodes[node].add(k)
            alloc.load[node] += src.rate_hz * model.reach[k - 1] * model.flops[k - 1] / speeds[node]
    _cover(model, nodes, speeds, sources, alloc, current)
    return alloc


def _route(model: ModelInfo, nodes: Sequence[NodeInfo], speeds: dict[str, float],
           src: SourceLoad, alloc: Allocation, keep: dict[tuple[str, int], float]
           ) -> tuple[dict[int, str] | None, float]:
    inf = float("inf")
    k_total = len(model.flops)
    best: list[dict[str, tuple[float, str | None]]] = []
    for k in range(1, k_total + 1):
        row: dict[str, tuple[float, str | None]] = {}
        r = model.reach[k - 1]
        for n in nodes:
            if not _can_host(n, k, alloc):
                continue
            s = model.flops[k - 1] / speeds[n.node]
            spare = max(SATURATED, 1.0 - alloc.load[n.node] - src.rate_hz * r * s)
            here = r * s / spare * keep.get((n.node, k), 1.0)
            if k == 1:
                row[n.node] = (here, None)
                continue
            options = []
            for p in nodes:
                if p.node not in best[-1]:
                    continue
                move = 0.0
                if p.node != n.node:
                    rate = p.link_bps
                    move = p.rtt_s + (model.out_bytes[k - 2] / rate if rate > 0 else 0.0)
                options.append((best[-1][p.node][0] + r * move + here, p.node))
            if options:
                total, via = min(options)
                row[n.node] = (total, via)
        if not row:
            return None, inf
        best.append(row)
    last, (cost, _) = min(best[-1].items(), key=lambda kv: (kv[1][0], kv[0]))
    route = {k_total: last}
    for k in range(k_total, 1, -1):
        prev = best[k - 1][route[k]][1]
        assert prev is not None
        route[k - 1] = prev
    return dict(sorted(route.items())), cost


def _fits(route: dict[int, str], nodes: Sequence[NodeInfo], alloc: Allocation) -> bool:
    """The DP checks capacity per segment, not per route: check the whole route."""
    for n in nodes:
        new = {k for k, node in route.items() if node == n.node} | alloc.nodes[n.node]
        if n.max_segments and len(new) > n.max_segments:
            return False
    return True


def _greedy(model: ModelInfo, nodes: Sequence[NodeInfo], speeds: dict[str, float],
            src: SourceLoad, alloc: Allocation) -> tuple[dict[int, str] | None, float]:
    """Segment by segment, the cheapest node that still has room (used when the DP's best
    route would overfill a node)."""
    trial = Allocation({n: set(v) for n, v in alloc.nodes.items()}, load=dict(alloc.load))
    route: dict[int, str] = {}
    total = 0.0
    for k in range(1, len(model.flops) + 1):
        r = model.reach[k - 1]
        options = []
        for n in nodes:
            if not _can_host(n, k, trial):
                continue
            s = model.flops[k - 1] / speeds[n.node]
            spare = max(SATURATED, 1.0 - trial.load[n.node] - src.rate_hz * r * s)
            prev = next((p for p in nodes if p.node == route.get(k - 1)), None)
            move = 0.0
            if prev is not None and prev.node != n.node:
                move = prev.rtt_s + (model.out_bytes[k - 2] / prev.link_bps
                                     if prev.link_bps > 0 else 0.0)
            options.append((r * (s / spare + move), n.node))
        if not options:
            return None, float("inf")
        cost, node = min(options)
        route[k] = node
        trial.nodes[node].add(k)
        total += cost
    return route, total


def _cover(model: ModelInfo, nodes: Sequence[NodeInfo], speeds: dict[str, float],
           sources: Sequence[SourceLoad], alloc: Allocation,
           current: dict[str, set[int]] | None) -> None:
    """Every segment gets a host, then the copies that share the work (:mod:`.replicas`)."""
    for k in range(1, len(model.flops) + 1):
        if not any(k in hosted for hosted in alloc.nodes.values()):
            able = [n for n in nodes if _can_host(n, k, alloc)]
            if able:
                fastest = max(able, key=lambda n: (speeds[n.node], n.node))
                alloc.nodes[fastest.node].add(k)
    rate = sum(s.rate_hz for s in sources) or 1.0
    demand = [rate * r * f for r, f in zip(model.reach, model.flops, strict=True)]
    by_name = {n.node: n for n in nodes}
    add_copies(alloc.nodes, demand, speeds, lambda node, k: _can_host(by_name[node], k, alloc),
               current)
