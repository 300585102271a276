"""Copies of segments for capacity (docs/algorithms.md 3.4), pure.

The routes say where a source's samples go when nothing else is known; what a cluster can
serve is decided by which nodes *host* each segment, because per-task placement shares a
segment's work among all its hosts by their backlogs. The best that sharing can do is the
bottleneck

    U* = max over sets S of segments of  demand(S) / speed(hosts of S)

(the least utilisation of the busiest node when every segment's demand, in FLOP/s, may be
split among its hosts in any proportion: Hall's condition for splittable demands). A plan
whose routes put every segment on one node has U* of that node alone, however many nodes sit
idle beside it.

So, after the routes, copies are added within each node's room (its loadable segments and
its maximum number of segments):

1. one at a time, each the one that lowers U* the most, until no copy lowers it by more than
   ``GAIN``. Where sets of segments tie at U*, no one copy lowers it: the levels below it,
   each segment's highest ``demand(S) / speed(hosts of S)``, are compared next, so that the
   tied sets get their copies in turn. Among equal copies the one next to a segment the node
   already hosts wins (a sample's chain then stays on one node), then the earlier segment,
   then the faster node;
2. the copies of the plan in force, so that moving rates do not make workers load and unload;
3. while room is left, copies next to what a node hosts, earlier segments first. U* counts
   no transfers: a split that balances it may still send every sample node to node, and
   only the nodes hosting segment 1 decode frames. Longer chains let placement keep a sample
   where it is. A node with no segment limit so ends with the whole model, and placement
   moves work between nodes only when their backlogs say so (MDI-Exit's rule).

Hosting a copy costs memory only (``OFFRAMP_WORKER_MAX_SEGMENTS`` bounds it): placement sends
a task to it only when its queue is shorter than the one where the sample is by more than the
transfer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

GAIN = 0.01  # least relative drop of the bottleneck worth a copy
EXACT_UP_TO = 8  # segments; beyond, sets are runs of consecutive segments only


def levels(demand: Sequence[float], hosts: Sequence[set[str]],
           speeds: dict[str, float]) -> list[float]:
    """Per segment, the highest ``demand(S) / speed(hosts of S)`` over the sets S that hold
    it; their maximum is U*. A segment with demand and no host is infinite."""
    names = sorted(speeds)
    bit = {n: 1 << i for i, n in enumerate(names)}
    masks = [sum(bit[n] for n in h) for h in hosts]
    speed_of: dict[int, float] = {}
    out = [0.0] * len(demand)
    for members in _subsets(len(demand)):
        need, nodes = 0.0, 0
        for i in members:
            need += demand[i]
            nodes |= masks[i]
        if need <= 0:
            continue
        speed = speed_of.get(nodes)
        if speed is None:
            speed = speed_of[nodes] = sum(speeds[n] for n in names if nodes & bit[n])
        u = need / speed if speed > 0 else float("inf")
        for i in members:
            out[i] = max(out[i], u)
    return out


@functools.cache
def _subsets(k_total: int) -> tuple[tuple[int, ...], ...]:
    """The sets of segments U* is taken over (0-based), made once per model size: a plan
    asks for them at every candidate copy."""
    if k_total <= EXACT_UP_TO:
        return tuple(tuple(i for i in range(k_total) if m >> i & 1)
                     for m in range(1, 1 << k_total))
    return tuple(tuple(range(i, j + 1)) for i in range(k_total) for j in range(i, k_total))


def _lower(new: list[float], old: list[float]) -> bool:
    """Whether ``new`` is lower, read from the highest level down, by more than GAIN."""
    for a, b in zip(sorted(new, reverse=True), sorted(old, reverse=True), strict=True):
        if abs(a - b) > GAIN * b:
            return a < b
    return False


def add_copies(hosted: dict[str, set[int]], demand: Sequence[float], speeds: dict[str, float],
               room: Callable[[str, int], bool],
               current: dict[str, set[int]] | None = None) -> list[tuple[str, int]]:
    """Add copies to ``hosted`` (node -> segments, 1-based) in place; return them in order.
    ``room(node, k)``: whether the node can take segment k now (it is asked again after
    every copy)."""
    k_total = len(demand)
    added: list[tuple[str, int]] = []
    while True:
        hosts = [{n for n, segs in hosted.items() if k in segs} for k in range(1, k_total + 1)]
        now = levels(demand, hosts, speeds)
        if not any(now) or max(now) == float("inf"):
            break
        # only a copy of a segment at the top level can lower U* (or, on a plateau of equal
        # sets, the next level down)
        top = [k for k in range(1, k_total + 1) if now[k - 1] >= (1 - GAIN) * max(now)]
        best: tuple[list[float], tuple[int, int, float, str]] | None = None
        for k in top:
            for node in sorted(hosted):
                if k in hosted[node] or not room(node, k):
                    continue
                hosts[k - 1].add(node)
                after = levels(demand, hosts, speeds)
                hosts[k - 1].discard(node)
                order = (0 if _near(hosted[node], k) else 1, k, -speeds[node], node)
                if best is None or _lower(after, best[0]) or \
                        (not _lower(best[0], after) and order < best[1]):
                    best = (after, order)
        if best is None or not _lower(best[0], now):
            break
        _, k, _, node = best[1]
        hosted[node].add(k)
        added.append((node, k))
    for node, segs in sorted((current or {}).items()):
        for k in sorted(segs):
            if node in hosted and k not in hosted[node] and 1 <= k <= k_total and room(node, k):
                hosted[node].add(k)
                added.append((node, k))
    while True:  # then room left goes to longer chains: fewer transfers, the first hop shared
        chains = [(k, -speeds[node], node) for node in hosted for k in range(1, k_total + 1)
                  if k not in hosted[node] and _near(hosted[node], k) and room(node, k)]
        if not chains:
            return added
        k, _, node = min(chains)
        hosted[node].add(k)
        added.append((node, k))


def _near(segs: set[int], k: int) -> bool:
    return not segs or k - 1 in segs or k + 1 in segs
