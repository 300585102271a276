"""Where the next task of a sample runs (docs/algorithms.md 1.3, with PA-MDI's priority-aware
backlog, 3.1).

Each candidate n (this node, if it hosts the segment, and every neighbour that does) costs
``E_n = c_n + Q_n^(>=m) + s_n``: the transfer time of the activation (0 for this node; else the
round trip plus, per raw byte, the codec's wire bytes over the link rate and its encode and
decode time: :mod:`offramp.policy.codecs`, the codec chosen for that link), the queued work of
equal or higher priority than the task's (the queue the task really waits behind, since higher
priority is served first) and the task's service time there (F_task / F_n, measured). The
task's own age, the remaining term of 3.1, is the same for every candidate and does not change
the choice. The cheapest wins; a neighbour must beat this node by more than ``margin_s``
(hysteresis, so near-ties stay local).

A candidate takes at most its ``credit`` samples (no herding, :mod:`offramp.policy.credits`).
Neighbours whose heartbeat is older than ``stale_after_s`` have no trustworthy cost: they are
used only as the plan's choice (``fallback``), and only within their credit. What no candidate
can take stays with the caller, who keeps it and tries again when credit arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Candidate:
    node: str
    backlog_s: float
    service_s: float
    age_s: float = 0.0
    link_bytes_per_s: float = 0.0  # 0: unknown, transfer counted as rtt only
    rtt_s: float = 0.0
    local: bool = False
    credit: int = UNLIMITED
    boot: float = 0.0
    wire_ratio: float = 1.0  # bytes on the wire per raw byte, by the codec for this link
    codec_s_per_byte: float = 0.0  # its encode plus decode time, per raw byte

    def cost(self, nbytes: int) -> float:
        """Seconds until a batch of ``nbytes`` (raw) would be done there."""
        if self.local:
            return self.backlog_s + self.service_s
        wire = nbytes * self.wire_ratio / self.link_bytes_per_s if self.link_bytes_per_s > 0 else 0
        transfer = self.rtt_s + wire + nbytes * self.codec_s_per_byte
        return self.backlog_s + transfer + self.service_s


@dataclass(frozen=True)
class Choice:
    node: str
    cost_s: float


def choose(candidates: Sequence[Candidate], nbytes: int, *, margin_s: float = 0.002,
           stale_after_s: float = 0.75) -> Choice | None:
    """The cheapest live candidate (credit not considered), or None if there is none."""
    live = [c for c in candidates if c.local or c.age_s <= stale_after_s]
    if not live:
        return None
    best = min(live, key=lambda c: (c.cost(nbytes), c.node))
    local = next((c for c in live if c.local), None)
    if local is not None and best is not local and local.cost(nbytes) - best.cost(nbytes) <= margin_s:
        best = local
    return Choice(best.node, best.cost(nbytes))


@dataclass(frozen=True)
class Placement:
    parts: tuple[tuple[str, int], ...]  # (node, samples), cheapest first
    kept: int  # samples no candidate could take now

    def node_of(self, index: int) -> str | None:
        """The node that takes the ``index``-th sample (samples are given out in order)."""
        for node, n in self.parts:
            if index < n:
                return node
            index -= n
        return None


def place(candidates: Sequence[Candidate], count: int, nbytes_per_sample: int, *,
          margin_s: float = 0.002, stale_after_s: float = 0.75,
          fallback: str | None = None) -> Placement:
    """Share ``count`` samples among candidates, cheapest first, each within its credit."""
    parts: list[tuple[str, int]] = []
    left = count
    pool = [c for c in candidates if c.credit > 0]
    while left and pool:
        choice = choose(pool, nbytes_per_sample * left, margin_s=margin_s,
                        stale_after_s=stale_after_s)
        if choice is None:
            break
        cand = next(c for c in pool if c.node == choice.node)
        take = min(left, cand.credit)
        parts.append((cand.node, take))
        left -= take
        pool.remove(cand)
    if left and fallback is not None:
        spare = next((c for c in candidates if c.node == fallback and c.credit > 0
                      and all(fallback != p[0] for p in parts)), None)
        if spare is not None:
            take = min(left, spare.credit)
            parts.append((spare.node, take))
            left -= take
    return Placement(tuple(parts), left)
