"""What a worker tells the others about its segments, heartbeat by heartbeat: each advertised
segment's queue state and the credit granted to each sender (one grant round per heartbeat),
and whether a sender waits for credit that a queue has room for now (then the heartbeat goes
out early)."""

from __future__ import annotations

import time

from offramp.node.peers import PeerTable
from offramp.wire import SegmentLoad
from segment_worker.segments import Segments
from segment_worker.settings import EngineConfig


class Advertiser:
    def __init__(self, segments: Segments, peers: PeerTable, cfg: EngineConfig, *, model: str,
                 boot: float) -> None:
        self.segments = segments
        self.peers = peers
        self.cfg = cfg
        self.model = model
        self.boot = boot

    def credit_due(self) -> bool:
        """Whether some sender waits for credit that a hosted segment's queue has room for now."""
        if self.segments.draining:
            return False
        now = time.monotonic()
        return any(h.ledger.due(len(h.queue), self.peers.requests(
            self.model, seg, self.cfg.stale_after_s, now), self.cfg.batch_max)
            for seg, h in self.segments.items() if not h.draining)

    def loads(self, now: float) -> tuple[SegmentLoad, ...]:
        """Queue state and fresh credit grants of every advertised segment (one grant round)."""
        out = []
        for seg in self.segments.serving():
            h = self.segments[seg]
            st = h.stats
            for sender, boot, count in self.peers.sent_to(self.cfg.node, self.boot,
                                                          self.model, seg):
                h.ledger.reported(sender, boot, count, now)
            h.ledger.bound = self.segments.credit_bound(seg)
            grants = h.ledger.grant(len(h.queue) + h.arriving, self.peers.requests(
                self.model, seg, self.cfg.stale_after_s, now), now)
            mean = st.samples / st.batches if st.batches else 0.0
            rate = 1.0 / st.service_s if st.service_s > 0 else 0.0
            out.append(SegmentLoad(model=self.model, segment=seg, queued=len(h.queue),
                                   backlog_s=len(h.queue) * st.service_s, service_rate=rate,
                                   mean_batch=mean, exited=st.exited, forwarded=st.forwarded,
                                   bound=self.cfg.queue_max, by_priority=h.queue.by_priority(),
                                   credits=grants))
        return tuple(out)
