"""What a node knows of the other workers, from their heartbeats and wills.

Used by segment-workers (where to send the next task) and the admission-controller (where to
send the first one). Turns heartbeats into :class:`offramp.policy.offload.Candidate`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from offramp.policy.offload import Candidate
from offramp.wire import Heartbeat, SegmentLoad


@dataclass
class Peer:
    node: str
    seen: float
    heartbeat: Heartbeat


class PeerTable:
    def __init__(self, own_node: str = "") -> None:
        self.own_node = own_node
        self._peers: dict[str, Peer] = {}

    def update(self, hb: Heartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; return True when a known worker went offline."""
        now = time.monotonic() if now is None else now
        if hb.node == self.own_node:
            return False
        if not hb.online:
            return self._peers.pop(hb.node, None) is not None
        self._peers[hb.node] = Peer(hb.node, now, hb)
        return False

    def forget(self, node: str) -> None:
        self._peers.pop(node, None)

    def nodes(self) -> list[str]:
        return sorted(self._peers)

    def load(self, node: str, model: str, segment: int) -> SegmentLoad | None:
        peer = self._peers.get(node)
        if peer is None:
            return None
        return next((s for s in peer.heartbeat.segments
                     if s.model == model and s.segment == segment), None)

    def candidates(self, model: str, segment: int, batch: int = 1,
                   now: float | None = None) -> list[Candidate]:
        """Every known worker hosting ``segment`` of ``model``, as an offloading candidate."""
        now = time.monotonic() if now is None else now
        out = []
        for peer in self._peers.values():
            for s in peer.heartbeat.segments:
                if s.model == model and s.segment == segment:
                    service = batch / s.service_rate if s.service_rate > 0 else 0.0
                    out.append(Candidate(peer.node, s.backlog_s, service, now - peer.seen))
        return out
