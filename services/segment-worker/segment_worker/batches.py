"""The batch runner: queue -> micro-batch -> segment and exit decision (together, on the
inference thread) -> completion, or on to the next segment (in memory when the next one runs
here in the same hand-off, through the placer otherwise).

The inference thread is this runner's: the sessions and their buffers are used from it only
(:meth:`BatchRunner.offload`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from offramp.model.bundle import Bundle
from offramp.model.resident import Activation, Batch, Outputs, stack_on_host
from offramp.model.sessions import SegmentRunner
from offramp.node.tracing import Tracing
from offramp.policy.exits import Deadlines, ExitDecision, decide
from offramp.wire import Completion, ExitPolicy, ExitReason, Hop, Sample
from segment_worker.placer import Placer
from segment_worker.queue import Item
from segment_worker.segments import Hosted, Segments
from segment_worker.settings import EngineConfig
from segment_worker.spans import record_batch

IN_FLIGHT = 2  # micro-batches per segment handed to the inference thread at once
# source, its samples that exited -> reported to their owner
Report = Callable[[str, list[Completion]], Awaitable[None]]


@dataclass(frozen=True)
class _Rule:
    """The exit rule for one micro-batch, fixed when it is taken."""

    criterion: str
    threshold: float | None
    last: bool
    to_next: float  # expected seconds to the next exit (the deadline rule)
    prev: np.ndarray | None  # the previous exit's embeddings (feature difference)
    deadlines: np.ndarray  # wall clock, nan: none


@dataclass(frozen=True)
class _Computed:
    """One segment's run of a micro-batch, as the inference thread hands it back."""

    out: Outputs
    decision: ExitDecision
    stay: list[int]  # rows that go on
    # their activations: kept (copied out of the run's buffers) after the last segment of a
    # run-through, only referenced where the next segment of it already took them
    kept: list[Activation]
    started: float
    finished: float


class BatchRunner:
    """Serves the hosted segments' queues. ``taken`` is called as each micro-batch is taken
    (the queue has room again: credit may be due); ``report`` gets the completions."""

    def __init__(self, segments: Segments, placer: Placer, cfg: EngineConfig, bundle: Bundle,
                 report: Report, *, taken: Callable[[], None] = lambda: None,
                 tracing: Tracing | None = None) -> None:
        self.segments = segments
        self.placer = placer
        self.cfg = cfg
        self.bundle = bundle
        self.report = report
        self.taken = taken
        self.tracing = tracing
        self.policy: ExitPolicy | None = None  # none yet: exits closed
        self.inflight = 0  # samples handed to the inference thread and not accounted for yet
        # CPU seconds of the inference thread inside the segments' sessions (with one intra-op
        # thread, ONNX Runtime computes on that thread)
        self.infer_cpu_s = 0.0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{cfg.node}")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the inference thread (sessions are used from that thread only)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def infer(self, runner: SegmentRunner, xs: Batch) -> tuple[Outputs, float, float]:
        """One run of ``runner`` on the calling thread: its outputs, start and end (wall)."""
        started, cpu = time.time(), time.thread_time()
        out = runner.run_rows(xs)
        self.infer_cpu_s += time.thread_time() - cpu
        if self.cfg.slowdown > 1.0:  # emulated slower node: this thread sleeps, as if throttled
            time.sleep((time.time() - started) * (self.cfg.slowdown - 1.0))
        return out, started, time.time()

    async def serve(self, segment: int, stop: asyncio.Event) -> None:
        """Serve ``segment`` until ``stop`` is set and its queue is empty (or it is unloaded).
        Up to IN_FLIGHT micro-batches at once: the next is taken and handed to the inference
        thread while the event loop still accounts for the one before (reports, hops, the
        next placement), so that neither thread waits for the other. The batch is taken only
        once a slot is free, so it is the most urgent one at that moment."""
        hosted = self.segments[segment]
        slots = asyncio.Semaphore(IN_FLIGHT)
        async with asyncio.TaskGroup() as batches:
            while not (stop.is_set() and len(hosted.queue) == 0):
                await self.placer.room(segment + 1)  # backpressure: parked work must fit
                await slots.acquire()
                try:
                    items = await hosted.queue.batch(self.cfg.batch_max, self.cfg.batch_wait_s)
                except BaseException:
                    slots.release()
                    raise
                self.taken()
                self.inflight += len(items)
                hosted.busy += len(items)
                batches.create_task(self._serve_batch(segment, hosted, items, slots))

    async def _serve_batch(self, segment: int, hosted: Hosted, items: list[Item],
                           slot: asyncio.Semaphore) -> None:
        try:
            await self._run_batch(segment, hosted, items)
        finally:
            self.inflight -= len(items)
            hosted.busy -= len(items)
            slot.release()
        await self.placer.retry()

    def _compute_through(self, runners: list[SegmentRunner], xs: Batch,
                         rules: list[_Rule]) -> list[_Computed]:
        """On the inference thread: run consecutive segments on a micro-batch, each followed
        by its exit decision (pure, on the policy as it was when the batch was taken), the
        rows that stay going straight into the next one (on the device when resident: one
        gather out of the run's buffer). Stops early when every row has exited. The rows
        that go on after the last are kept (copied out before its session runs again)."""
        done: list[_Computed] = []
        rule = rules[0]
        for j, runner in enumerate(runners):
            out, started, finished = self.infer(runner, xs)
            d = decide(rule.criterion, rule.threshold, out.logits, out.embedding, rule.prev,
                       last=rule.last, deadlines=Deadlines(rule.deadlines, finished, rule.to_next))
            stay = [i for i in range(len(d.exits)) if not d.exits[i]]
            if not stay or out.activation is None or j == len(runners) - 1:
                kept = runner.keep(out.activation, stay) if stay and out.activation is not None \
                    else []
                done.append(_Computed(out, d, stay, kept, started, finished))
                break
            xs = runner.pass_on(out.activation, stay)
            done.append(_Computed(out, d, stay, list(xs), started, finished))
            rule = replace(rules[j + 1], prev=out.embedding[stay],
                           deadlines=rule.deadlines[stay])
        return done

    def _through(self, segment: int, items: list[Item]) -> list[int]:
        """``segment`` and the segments after it that this micro-batch runs in the same
        hand-off to the inference thread: each hosted here and serving, with nothing queued
        or parked for it (no one is overtaken), and here the placer's choice for the batch
        now (a neighbour with less backlog still gets the work between segments)."""
        chain = [segment]
        if not self.cfg.run_through:
            return chain
        priority = max(it.sample.priority for it in items)
        while chain[-1] < self.bundle.num_segments:
            nxt = chain[-1] + 1
            h = self.segments.get(nxt)
            if (h is None or h.draining or len(h.queue)
                    or not self.placer.stays_here(nxt, priority, len(items),
                                                  self.bundle.segment(chain[-1]).activation_bytes)):
                break
            chain.append(nxt)
        return chain

    def _rule(self, segment: int, items: list[Item], policy: ExitPolicy | None) -> _Rule:
        last = segment == self.bundle.num_segments
        prevs = [it.prev for it in items if it.prev is not None]
        deadlines = [it.sample.deadline for it in items]
        to_next = 0.0
        if not last and any(t is not None for t in deadlines):  # only the deadline rule reads it
            per_sample = self.bundle.segment(segment).activation_bytes
            to_next = self.placer.estimate(segment + 1, per_sample * len(items))
        threshold = None
        if policy is not None and not last and segment <= len(policy.thresholds):
            threshold = policy.thresholds[segment - 1]
        return _Rule(policy.criterion if policy else "confidence", threshold, last, to_next,
                     np.stack(prevs) if len(prevs) == len(items) else None,
                     np.array([math.nan if t is None else t for t in deadlines]))

    async def _run_batch(self, segment: int, hosted: Hosted, items: list[Item]) -> None:
        policy = self.policy
        chain = self._through(segment, items)
        rules = [self._rule(s, items, policy) for s in chain]
        later = [self.segments[s] for s in chain[1:]]
        for h in later:  # computed now, though nothing is queued there: not to be unloaded
            h.busy += len(items)
        try:
            computed: list[_Computed] = await self.offload(
                self._compute_through, [self.segments[s].runner for s in chain],
                stack_on_host([it.x for it in items]), rules)
        finally:
            for h in later:
                h.busy -= len(items)
        thresholds = tuple(policy.thresholds) if policy else ()
        for j, c in enumerate(computed):
            seg = chain[j]
            samples = await self._finish(seg, self.segments[seg], items, c, thresholds)
            if j + 1 < len(computed):  # on into the next segment of the run-through, here
                self.segments[chain[j + 1]].stats.handed_over += len(c.stay)
                items = [Item(samples[i], x, c.out.embedding[i], c.finished, c.finished)
                         for i, x in zip(c.stay, c.kept, strict=True)]
            elif c.kept:
                now, emb = time.time(), c.out.embedding
                await self.placer.forward(seg + 1, [Item(samples[i], x, emb[i], now, now)
                                                    for i, x in zip(c.stay, c.kept, strict=True)])

    async def _finish(self, segment: int, hosted: Hosted, items: list[Item], c: _Computed,
                      thresholds: tuple[float, ...]) -> list[Sample]:
        """One segment's run of a micro-batch, accounted for: its statistics, each sample's
        hop, the completions of those that exit (reported), their spans. Returns the samples
        with the hop added."""
        started, finished, d = c.started, c.finished, c.decision
        hosted.stats.record(len(items), finished - started)
        hosted.batch_sizes.observe(len(items))
        node = self.cfg.node
        samples = [replace(it.sample, hops=(*it.sample.hops, Hop(
            node=node, segment=segment, arrived=it.arrived, started=started, finished=finished)))
            for it in items]
        done: dict[str, list[Completion]] = {}
        for i, sample in enumerate(samples):
            if d.exits[i]:
                done.setdefault(sample.source, []).append(Completion(
                    task_id=sample.task_id, source=sample.source, frame_id=sample.frame_id,
                    attempt=sample.attempt, label=int(d.labels[i]),
                    confidence=float(d.confidence[i]), exit_index=segment,
                    reason=cast(ExitReason, d.reasons[i]), node=node, ts=finished,
                    hops=sample.hops, thresholds=thresholds, created=sample.created))
        if self.tracing is not None and self.tracing.enabled:
            record_batch(self.tracing, node, segment, items, d, started, finished)
        for source, completions in done.items():
            await self.report(source, completions)
        hosted.stats.exited += len(items) - len(c.stay)
        return samples
