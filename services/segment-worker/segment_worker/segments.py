"""The segments a worker hosts: each one's session, queue, statistics and credit ledger, which
of them are advertised, and this node's side of placement (:class:`~segment_worker.placer.
Stages`: the node as a candidate for a segment, a hand-over in memory).

Segments come and go while the worker runs: :meth:`Segments.host` adds one, :meth:`Segments.
release` stops advertising it while its queue drains, :meth:`Segments.unload` removes it.
:meth:`Segments.drain` stops advertising all of them (the worker is stopping).
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram

from offramp.model.sessions import SegmentRunner
from offramp.policy.credits import CreditLedger
from offramp.policy.offload import Candidate
from offramp.wire import Refused, Sample
from segment_worker.queue import Item, SegmentQueue
from segment_worker.settings import EngineConfig


@dataclass
class SegmentStats:
    service_s: float = 0.0  # EWMA of seconds per sample
    batches: int = 0
    samples: int = 0
    exited: int = 0
    forwarded: int = 0
    handed_over: int = 0

    def record(self, batch: int, seconds: float) -> None:
        per = seconds / batch
        self.service_s = per if self.service_s == 0 else 0.8 * self.service_s + 0.2 * per
        self.batches += 1
        self.samples += batch


@dataclass
class Hosted:
    """One segment this worker runs: its session, queue, statistics and credit ledger."""

    runner: SegmentRunner
    queue: SegmentQueue
    ledger: CreditLedger
    batch_sizes: Histogram  # this segment's child of offramp_batch_size
    stats: SegmentStats = field(default_factory=SegmentStats)
    draining: bool = False
    busy: int = 0  # samples of this segment being computed now
    # samples taken off the wire on credit and not queued yet (a first hop's frames are decoded
    # first): the credit room counts them, or a grant made meanwhile overfills the queue
    arriving: int = 0


class Segments:
    """The hosted-segment table. Samples it cannot queue are refused: kept until
    :meth:`take_refused` hands them to whoever tells their owners."""

    def __init__(self, cfg: EngineConfig, flops: dict[int, float], log: Any) -> None:
        self.cfg = cfg
        self.flops = flops  # segment -> FLOPs per sample (the bundle's manifest)
        self.log = log
        self.hosted: dict[int, Hosted] = {}
        self.draining = False  # the worker is stopping: nothing advertised, no credit
        self.queue_overflow = 0
        self._refused: list[tuple[str, Refused]] = []  # (source, sample not taken), untold
        self._measured: dict[int, float] = {}  # segment -> seconds per sample at load

    def __contains__(self, segment: int) -> bool:
        return segment in self.hosted

    def __getitem__(self, segment: int) -> Hosted:
        return self.hosted[segment]

    def __iter__(self) -> Iterator[int]:
        return iter(self.hosted)

    def get(self, segment: int) -> Hosted | None:
        return self.hosted.get(segment)

    def items(self) -> ItemsView[int, Hosted]:
        return self.hosted.items()

    # -- coming and going -----------------------------------------------------------------------
    def host(self, segment: int, hosted: Hosted) -> None:
        self.hosted[segment] = hosted
        self._measured[segment] = hosted.stats.service_s

    def release(self, segment: int) -> None:
        if segment in self.hosted:
            self.hosted[segment].draining = True

    def reclaim(self, segment: int) -> None:
        """Undo a release that has not finished (the plan gave the segment back)."""
        if segment in self.hosted:
            self.hosted[segment].draining = False

    def empty(self, segment: int) -> bool:
        """Whether a released ``segment`` holds nothing (queued or being computed)."""
        h = self.hosted.get(segment)
        return h is None or (h.draining and len(h.queue) == 0 and h.busy == 0)

    def unload(self, segment: int) -> None:
        self.hosted.pop(segment, None)

    def serving(self) -> list[int]:
        """Segments advertised to others (hosted and not released; none once the worker
        drains)."""
        if self.draining:
            return []
        return sorted(s for s, h in self.hosted.items() if not h.draining)

    def drain(self) -> None:
        """Stop advertising every segment and granting credit; what is queued is still served."""
        self.draining = True

    def queued(self) -> int:
        return sum(len(h.queue) for h in self.hosted.values())

    # -- queueing -------------------------------------------------------------------------------
    def enqueue(self, segment: int, items: list[Item]) -> int:
        """Queue ``items`` for ``segment``; what does not fit is refused. Returns how many
        were taken."""
        rejected = self.hosted[segment].queue.push(items)
        if rejected:
            self.queue_overflow += len(rejected)
            self.log.warning("queue_overflow", segment=segment, dropped=len(rejected),
                             bound=self.cfg.queue_max)
            self.refuse([it.sample for it in rejected],
                        f"segment {segment}'s queue on {self.cfg.node} is full")
        return len(items) - len(rejected)

    def refuse(self, samples: Sequence[Sample], reason: str) -> None:
        self._refused += [(s.source, Refused(task_id=s.task_id, attempt=s.attempt,
                                             reason=reason)) for s in samples]

    def take_refused(self) -> list[tuple[str, Refused]]:
        refused, self._refused = self._refused, []
        return refused

    # -- this node's side of placement (segment_worker.placer.Stages) ---------------------------
    def local_candidate(self, segment: int, priority: float) -> Candidate | None:
        """This node for ``segment``, unless it does not host it or the plan took it away. A
        draining worker still takes its own work from one segment to the next."""
        h = self.hosted.get(segment)
        if h is None or h.draining:
            return None
        per = h.stats.service_s
        room = self.cfg.queue_max - len(h.queue) - h.ledger.outstanding()
        backlog = sum(n for p, n in h.queue.by_priority() if p >= priority) * per
        return Candidate(self.cfg.node, backlog, per, local=True, credit=max(0, room))

    def hand_over(self, segment: int, items: list[Item]) -> None:
        self.hosted[segment].stats.handed_over += self.enqueue(segment, items)

    # -- what a segment costs here --------------------------------------------------------------
    def credit_bound(self, segment: int) -> int:
        """The samples of ``segment`` this node grants credit for: ``credit_queue_s`` of work
        at the time a sample takes here from that segment on (through the hosted segments
        after it that a micro-batch runs through), at least two micro-batches, at most
        ``queue_max``. A flood sent at once otherwise sat in one node's queue for seconds
        while the others, done with theirs, idled: the sender keeps what is beyond and gives
        it to whichever node frees first."""
        if self.cfg.credit_queue_s <= 0:
            return self.cfg.queue_max
        chain_s, k = 0.0, segment
        while k in self.hosted and (k == segment or self.cfg.run_through):
            chain_s += self.hosted[k].stats.service_s
            k += 1
        if chain_s <= 0:
            return self.cfg.queue_max
        return min(self.cfg.queue_max, max(2 * self.cfg.batch_max,
                                           math.ceil(self.cfg.credit_queue_s / chain_s)))

    def flops_per_s(self) -> float:
        """The node's speed for the plan: FLOPs over the time of every segment ever hosted
        here, each measured once at load on a full micro-batch. Not the live service rate,
        which moves with batch sizes and with the plan itself (a feedback loop that made plans
        flip between equal nodes)."""
        seconds = sum(self._measured.values())
        return sum(self.flops[s] for s in self._measured) / seconds if seconds else 0.0
