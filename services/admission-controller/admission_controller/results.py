"""Every frame's one answer: its JSON result on ``results/{source}`` (and on the frame's MQTT v5
response topic, with its correlation data, when it has one), the metrics and counts it adds,
published QoS 1 through a bounded outbox (many in flight, none lost from view). Once the
answer is at the broker, the frame itself is acknowledged to it: a crash before that hands the
frame to the next admission-controller through the ingest session."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

from admission_controller.answers import Answers, Told
from offramp.bus import Message, Topics
from offramp.bus.outbox import Outbox
from offramp.errors import OfframpError, RefusedError, TopicError
from offramp.node.metrics import LATENCY_BUCKETS, Metrics
from offramp.node.tracing import Tracing
from offramp.wire import STATUSES, Completion, Result, Status

Publish = Callable[[str, bytes, bytes | None], Awaitable[None]]  # topic, payload, correlation
Acknowledge = Callable[[Message], None]  # the ingest message, to the broker


@dataclass(frozen=True)
class Delivery:
    """How an answer leaves: published (on the service's connection), then the frame it
    answers acknowledged (on the ingest session's)."""

    publish: Publish
    acknowledge: Acknowledge = lambda msg: None


@dataclass(frozen=True)
class Owed:
    """A frame owed its one answer: its ids, since when it waits (for its latency), the
    ingest message (its response topic, what to acknowledge) and its span, if traced."""

    task_id: str
    source: str
    frame_id: str
    created: float | None = None
    origin: Message | None = None
    trace: Any = None


# The source label of frames from sources the controller keeps no state for, so that a
# client naming a new source per frame cannot add a label per frame.
UNTRACKED = "(untracked)"
INVALID = "(invalid)"


class Results:
    """Use as ``async with Results(...) as results:``; on the way out the results still in
    flight get a few seconds to reach the broker."""

    def __init__(self, *, classes: Sequence[str], topics: Topics, delivery: Delivery,
                 metrics: Metrics, log: Any, in_flight: int, tracing: Tracing | None = None,
                 answers: Answers | None = None) -> None:
        self.classes = classes
        self.answers = answers
        self.tracing = tracing
        self.topics = topics
        self.delivery = delivery
        self.log = log
        self.outbox = Outbox(in_flight)
        self.counts: Counter[str] = Counter()
        self.m_results = metrics.counter("offramp_results_total", "Results published, by source "
                                         "and status", ["source", "status"])
        self.m_exits = metrics.counter("offramp_exits_total", "Frames answered at each exit",
                                       ["exit"])
        self.m_latency = metrics.histogram("offramp_latency_seconds", "Ingest to result of 'ok' "
                                           "frames, by source", LATENCY_BUCKETS, ["source"])
        self.m_again = metrics.counter("offramp_answered_again_total", "Frames sent again "
                                       "after their answer, given that answer again")

    def forget(self, source: str) -> None:
        """Drop an evicted source's metric labels."""
        for metric, labels in ((self.m_latency, (source,)),
                               *((self.m_results, (source, s)) for s in STATUSES)):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    async def __aenter__(self) -> Self:
        await self.outbox.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.outbox.__aexit__(exc_type, exc, tb)

    async def answer(self, owed: Owed, status: Status, *, error: str | None = None,
                     done: Completion | None = None, label: str | None = None) -> None:
        """Publish the result of one frame: from its completion (``ok``), or with ``error``
        saying why it got none; its span ends once the answer is out. ``label``: the source
        the metrics count it under, where that is not one the controller tracks (an invalid
        or untracked source would add a label per name)."""
        task_id, source, frame_id = owed.task_id, owed.source, owed.frame_id
        created, origin, trace = owed.created, owed.origin, owed.trace
        now = time.time()
        result = Result(task_id=task_id, source=source, frame_id=frame_id, status=status,
                        error=error, ts=now)
        if done is not None:
            result = self._completed(result, done, now)
            self.m_exits.labels(exit=done.exit_index).inc()
            self.m_latency.labels(source=source).observe(now - done.created)
        elif created is not None:
            result = replace(result, latency_ms={"total": round(1000 * (now - created), 3)})
        self.counts[status] += 1
        self.m_results.labels(source=label or source, status=status).inc()
        payload = result.to_json()
        if self.answers is not None:
            self.answers.keep(source, frame_id, Told(result=payload), time.monotonic())
        publish = self._publish(task_id, source, payload, origin)
        if trace is not None and self.tracing is not None:
            publish = self._traced(publish, trace, now, status)
        await self.outbox.send(publish)

    def acknowledge(self, origin: Message) -> None:
        """Acknowledge a frame answered by other means (a refusal, a frame taken once)."""
        self.delivery.acknowledge(origin)

    def told(self, source: str, frame_id: str) -> Told | None:
        """What the frame was answered within the dedup window, if that is still kept."""
        return self.answers.told(source, frame_id, time.monotonic()) \
            if self.answers is not None else None

    def answered_again(self) -> None:
        """Count a frame sent again and told its answer again (here, or in a refusal)."""
        self.counts["answered_again"] += 1
        self.m_again.inc()

    async def again(self, source: str, frame_id: str, result: bytes, origin: Message) -> None:
        """A frame sent again after it was answered: the same result (task id included),
        on the same topics; then the frame is acknowledged. Not counted as a result again."""
        self.answered_again()
        await self.outbox.send(self._publish(f"again:{frame_id}", source, result, origin))

    def counted(self, source: str, status: Status, frames: int) -> None:
        """Frames answered together elsewhere (a refusal), in the counts and metrics."""
        self.counts[status] += frames
        self.m_results.labels(source=source, status=status).inc(frames)

    async def _traced(self, publish: Coroutine[Any, Any, None], trace: Any, start: float,
                      status: Status) -> None:
        """``publish``, then the answer's span (until the result is at the broker) and the end
        of the frame's span."""
        assert self.tracing is not None
        await publish
        end = time.time()
        self.tracing.record(trace, "answer", start, end, {"offramp.status": status})
        self.tracing.end(trace, end, {"offramp.status": status})

    def _completed(self, result: Result, done: Completion, now: float) -> Result:
        queue = sum(h.started - h.arrived for h in done.hops)
        compute = sum(h.finished - h.started for h in done.hops)
        total = now - done.created
        known = 0 <= done.label < len(self.classes)
        return replace(result, label=done.label,
                       class_name=self.classes[done.label] if known else None,
                       confidence=round(done.confidence, 6), exit_index=done.exit_index,
                       reason=done.reason, nodes=[h.node for h in done.hops],
                       thresholds=list(done.thresholds),
                       latency_ms={"total": round(1000 * total, 3),
                                   "queue": round(1000 * queue, 3),
                                   "compute": round(1000 * compute, 3),
                                   "transfer": round(1000 * max(0.0, total - queue - compute), 3)})

    async def _publish(self, task_id: str, source: str, payload: bytes,
                       origin: Message | None) -> None:
        """Publish, then acknowledge the frame. A result that could not be published for now
        (no connection) leaves the frame unacknowledged: the broker hands it out again, a
        redelivery rather than a loss. One the broker refuses (its ACL) is logged, and the
        frame acknowledged: sending it again would be refused again."""
        reply = origin.response_topic if origin is not None else None
        try:
            await self.delivery.publish(self.topics.results(source), payload, None)
        except TopicError as exc:  # a source no results topic can be made of
            if reply is None:
                self.log.error("result_not_published", task_id=task_id, error=str(exc))
        except RefusedError as exc:
            self.log.error("result_refused", task_id=task_id, error=str(exc))
        except OfframpError as exc:
            self.log.error("result_not_published", task_id=task_id, error=str(exc))
            return
        if reply is not None and origin is not None:
            try:
                await self.delivery.publish(reply, payload, origin.correlation_data)
            except RefusedError as exc:
                self.log.warning("reply_refused", task_id=task_id, topic=reply, error=str(exc))
            except OfframpError as exc:
                self.log.error("reply_not_published", task_id=task_id, error=str(exc))
                return
        if origin is not None:
            self.delivery.acknowledge(origin)
