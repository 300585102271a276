"""Where the next task of a sample runs: queue-backlog offloading (ALGORITHMS.md 1.3, our rule
in the spirit of MDI-Exit's queue-driven policy).

Each candidate m (this node, if it hosts the segment, and every neighbour that does) costs
``Q_m + c_nm + s_m``: its backlog in seconds, the transfer time of the activation (bytes / link
rate + round trip; 0 for this node) and the task's service time there. The cheapest wins; a
neighbour must beat this node by more than ``margin_s`` (hysteresis, so near-ties stay local).
Neighbours whose heartbeat is older than ``stale_after_s`` are not candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    node: str
    backlog_s: float
    service_s: float
    age_s: float = 0.0
    link_bytes_per_s: float = 0.0  # 0: unknown, transfer counted as rtt only
    rtt_s: float = 0.0
    local: bool = False

    def cost(self, nbytes: int) -> float:
        if self.local:
            return self.backlog_s + self.service_s
        transfer = self.rtt_s + (nbytes / self.link_bytes_per_s if self.link_bytes_per_s > 0 else 0)
        return self.backlog_s + transfer + self.service_s


@dataclass(frozen=True)
class Choice:
    node: str
    cost_s: float


def choose(candidates: Sequence[Candidate], nbytes: int, *, margin_s: float = 0.002,
           stale_after_s: float = 0.75) -> Choice | None:
    """The node for the next task, or None if no live candidate hosts it."""
    live = [c for c in candidates if c.local or c.age_s <= stale_after_s]
    if not live:
        return None
    best = min(live, key=lambda c: (c.cost(nbytes), c.node))
    local = next((c for c in live if c.local), None)
    if local is not None and best is not local and local.cost(nbytes) - best.cost(nbytes) <= margin_s:
        best = local
    return Choice(best.node, best.cost(nbytes))
