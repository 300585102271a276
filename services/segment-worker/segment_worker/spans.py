"""The spans of a micro-batch's traced samples (docs/architecture.md, Traces)."""

from __future__ import annotations

import time

from offramp.node.tracing import AttributeValue, Tracing
from offramp.policy.exits import ExitDecision
from segment_worker.queue import Item


def record_batch(tracing: Tracing, node: str, segment: int, items: list[Item], d: ExitDecision,
                 started: float, finished: float) -> None:
    """For each traced sample of one micro-batch of ``segment`` on ``node``: how it got here
    (placement after the previous segment, by the clock of the node that ran it, and the
    transfer when it came from another node), the segment with its queue wait and compute,
    and the exit decision for those that exit."""
    record = tracing.record
    for i, it in enumerate(items):
        parent = it.sample.trace
        if parent is None:
            continue
        attrs: dict[str, AttributeValue] = {
            "offramp.node": node, "offramp.segment": segment,
            "offramp.task_id": it.sample.task_id, "offramp.attempt": it.sample.attempt}
        if it.sample.hops and it.sample.hops[-1].finished < it.sent:
            prev = it.sample.hops[-1]
            record(parent, f"placement for segment {segment}", prev.finished, it.sent,
                   {**attrs, "offramp.node": prev.node})
        if it.sent and it.sent < it.arrived:  # not for a hand-over on this node
            record(parent, f"transfer to segment {segment}", it.sent, it.arrived, attrs)
        span = record(parent, f"segment {segment}", it.arrived, finished,
                      {**attrs, "offramp.batch": len(items)})
        record(span, "queue", it.arrived, started)
        record(span, "compute", started, finished)
        if d.exits[i]:
            record(parent, "exit", finished, time.time(), {
                **attrs, "offramp.exit": segment, "offramp.reason": str(d.reasons[i]),
                "offramp.confidence": float(d.confidence[i]), "offramp.label": int(d.labels[i])})
