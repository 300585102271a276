"""What a node knows of the others, from their heartbeats and wills.

Used by segment-workers and the admission-controller: which neighbours host a segment, what
their backlog costs a task of a given priority, how much credit they granted this node, and
(receiver side) what the others want to send and say they have sent. Turns heartbeats into
:class:`offramp.policy.offload.Candidate`\\ s and :class:`offramp.policy.credits.Request`\\ s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from offramp.policy.bundles import conflicts
from offramp.policy.credits import Request, SendWindow
from offramp.policy.offload import UNLIMITED, Candidate
from offramp.wire import Heartbeat, SegmentLoad


@dataclass
class Peer:
    node: str
    seen: float
    heartbeat: Heartbeat


MAX_QUEUE_S = 30.0  # the most a heartbeat's queue_s extends the wait for the next


class PeerTable:
    """``bundle``: the identity of the bundle this node serves. A peer that serves other
    graphs under the same model name is kept apart (:attr:`conflicting`): never a candidate,
    its wants and counts not read, as if it were offline."""

    def __init__(self, own_node: str = "", bundle: str = "") -> None:
        self.own_node = own_node
        self.bundle = bundle
        self._peers: dict[str, Peer] = {}
        self.conflicting: dict[str, Peer] = {}

    def update(self, hb: Heartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; return True when a known node went offline (or turned out to
        serve another bundle of this model)."""
        now = time.monotonic() if now is None else now
        if hb.node == self.own_node:
            return False
        if not hb.online:
            self.conflicting.pop(hb.node, None)
            return self._peers.pop(hb.node, None) is not None
        if conflicts(self.bundle, hb.bundle):
            self.conflicting[hb.node] = Peer(hb.node, now, hb)
            return self._peers.pop(hb.node, None) is not None
        self.conflicting.pop(hb.node, None)
        self._peers[hb.node] = Peer(hb.node, now, hb)
        return False

    def bundles(self, role: str, stale_after_s: float, now: float | None = None
                ) -> dict[str, str]:
        """Node -> the bundle it serves, for every node of ``role`` heard from within
        ``stale_after_s`` and not draining, those kept apart included."""
        now = time.monotonic() if now is None else now
        return {p.node: p.heartbeat.bundle
                for p in [*self._peers.values(), *self.conflicting.values()]
                if p.heartbeat.role == role and not p.heartbeat.draining
                and now - p.seen <= stale_after_s}

    def forget(self, node: str) -> None:
        self._peers.pop(node, None)
        self.conflicting.pop(node, None)

    def nodes(self, role: str | None = None) -> list[str]:
        return sorted(n for n, p in self._peers.items()
                      if role is None or p.heartbeat.role == role)

    def heartbeat(self, node: str) -> Heartbeat | None:
        peer = self._peers.get(node)
        return peer.heartbeat if peer else None

    def age(self, node: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        peer = self._peers.get(node)
        return now - peer.seen if peer else float("inf")

    def silent(self, node: str, stale_after_s: float, now: float | None = None) -> bool:
        """Whether ``node`` is known and has not been heard from for longer than
        ``stale_after_s`` plus twice the queue it said its next heartbeat would wait behind
        (a node sending megabytes over a slow link is busy, not gone; the allowance is capped
        at a minute)."""
        peer = self._peers.get(node)
        if peer is None:
            return False
        allowance = 2 * min(max(peer.heartbeat.queue_s, 0.0), MAX_QUEUE_S)
        return self.age(node, now) > stale_after_s + allowance

    def load(self, node: str, model: str, segment: int) -> SegmentLoad | None:
        peer = self._peers.get(node)
        if peer is None:
            return None
        return next((s for s in peer.heartbeat.segments
                     if s.model == model and s.segment == segment), None)

    def rate_to(self, node: str, link_bps: float) -> float:
        """Bytes/s from this node to ``node``: as ``node`` measured the path where it has,
        else this node's own link (``link_bps``; 0: unknown)."""
        peer = self._peers.get(node)
        return (peer.heartbeat.paths.get(self.own_node, 0.0) if peer else 0.0) or link_bps

    def candidates(self, model: str, segment: int, batch: int = 1, *, priority: float = 0.0,
                   window: SendWindow | None = None, link_bps: float = 0.0, rtt_s: float = 0.0,
                   now: float | None = None) -> list[Candidate]:
        """Every known worker hosting ``segment`` of ``model``, as an offloading candidate: its
        backlog counts only work of priority >= ``priority``; with a ``window``, its credit for
        this node; ``link_bps``/``rtt_s`` describe this node's outgoing link, and the rate to a
        worker is the one it measured on the path from this node where it has (its heartbeat's
        ``paths``), else ``link_bps``. A worker whose
        heartbeat says it is draining is no candidate, whatever it still lists."""
        now = time.monotonic() if now is None else now
        out = []
        for peer in self._peers.values():
            hb = peer.heartbeat
            if hb.role != "worker" or hb.draining:
                continue
            for s in hb.segments:
                if s.model != model or s.segment != segment:
                    continue
                per = 1.0 / s.service_rate if s.service_rate > 0 else 0.0
                backlog = s.queued_at_or_above(priority) * per if s.by_priority else s.backlog_s
                credit = UNLIMITED
                if window is not None:
                    credit = window.available(peer.node, hb.boot, model, segment,
                                              s.credits.get(window.node))
                out.append(Candidate(peer.node, backlog, batch * per, now - peer.seen,
                                     self.rate_to(peer.node, link_bps), rtt_s, credit=credit,
                                     boot=hb.boot))
        return out

    def segment_backlogs(self, model: str, segments: int, stale_after_s: float, *,
                         priority: float = 0.0) -> list[list[float]]:
        """Per segment 1..``segments``, the seconds a sample of ``priority`` would spend at each
        fresh host (backlog ahead of it plus its own service): the input of Q_path."""
        now = time.monotonic()
        return [[c.backlog_s + c.service_s
                 for c in self.candidates(model, seg, priority=priority, now=now)
                 if c.age_s <= stale_after_s] for seg in range(1, segments + 1)]

    def requests(self, model: str, segment: int, stale_after_s: float,
                 now: float | None = None) -> list[Request]:
        """What fresh senders want to send to ``segment`` of ``model`` (grant round input)."""
        now = time.monotonic() if now is None else now
        return [Request(p.node, p.heartbeat.boot, w.priority, w.count)
                for p in self._peers.values() if now - p.seen <= stale_after_s
                for w in p.heartbeat.wants if w.model == model and w.segment == segment]

    def sent_to(self, receiver: str, receiver_boot: float, model: str, segment: int
                ) -> list[tuple[str, float, int]]:
        """(sender, sender boot, count) that senders report having sent to this receiver."""
        return [(p.node, p.heartbeat.boot, c.count) for p in self._peers.values()
                for c in p.heartbeat.sent
                if c.receiver == receiver and c.receiver_boot == receiver_boot
                and c.model == model and c.segment == segment]
