"""The segment-worker's own engine hosting a whole bundle in one process, no broker: queues,
micro-batching, exit decisions and hand-overs between its segments (on the device when
resident), everything a worker does but the bus. ``make bench-gpu``'s ``worker`` rows.

Samples go in at segment 1 all at once; the rate is samples over the time until the engine has
reported every one of them done (at whichever exit). With an exit policy, each completion's
label and exit are kept, so that the rate comes with the accuracy it was bought at.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from offramp.bus import Topics
from offramp.model.bundle import Bundle
from offramp.model.providers import GpuOptions
from offramp.node.peers import PeerTable
from offramp.wire import DoneReport, ExitPolicy, Sample
from segment_worker.engine import Engine, Port
from segment_worker.queue import Item
from segment_worker.settings import EngineConfig

MAX_SAMPLES = 1 << 15  # per timed run


@dataclass(frozen=True)
class EngineRun:
    img_per_s: float
    samples: int
    labels: np.ndarray  # the timed run's label for each sample i (input x[i % len(x)])
    exits: dict[int, int]  # exit index -> samples that left there
    device: str  # where the engine's sessions really ran


def engine_run(bundle: Bundle, device: str, batch: int, x: np.ndarray, seconds: float,
               policy: ExitPolicy | None = None, run_through: bool = True) -> EngineRun:
    """The engine at micro-batch ``batch`` on inputs ``x`` (cycled), timed for about
    ``seconds`` after a warm-up run. ``policy``: exit thresholds (None: exits closed).
    ``run_through``: as OFFRAMP_WORKER_RUN_THROUGH (False: one hand-off per segment)."""
    return asyncio.run(_engine_run(bundle, device, batch, x, seconds, policy, run_through))


async def _engine_run(bundle: Bundle, device: str, batch: int, x: np.ndarray, seconds: float,
                      policy: ExitPolicy | None, run_through: bool) -> EngineRun:
    labels: dict[int, int] = {}
    exits: Counter[int] = Counter()
    finished = asyncio.Event()
    target = 0

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        for c in DoneReport.decode(payload).completions:
            labels[int(c.frame_id[1:])] = c.label
            exits[c.exit_index] += 1
        if target and len(labels) >= target:
            finished.set()

    cfg = EngineConfig(node="bench", batch_max=batch, batch_wait_s=0.0, run_through=run_through,
                       queue_max=MAX_SAMPLES * 2,
                       device=device, threads=os.cpu_count() or 1,
                       resident=device != "cpu", gpu=GpuOptions())
    loop = asyncio.get_running_loop()
    async with Engine(bundle, cfg, PeerTable("bench"), Port(Topics("bench"), publish)) as engine:
        for s in bundle.manifest.segments:
            engine.host(s.index, await loop.run_in_executor(None, engine.load, s.index))
        engine.apply_policy(policy)
        stop = asyncio.Event()
        servers = [asyncio.create_task(engine.serve(s.index, stop))
                   for s in bundle.manifest.segments]

        async def run(n: int) -> float:
            nonlocal target
            labels.clear()
            exits.clear()
            target = n
            finished.clear()
            now = time.time()
            items = [Item(Sample(task_id=f"t{i}", source="bench", frame_id=f"f{i}",
                                 created=now), x[i % len(x)], None, now) for i in range(n)]
            t0 = time.perf_counter()
            engine.segments.enqueue(1, items)
            await asyncio.wait_for(finished.wait(), 600)
            return time.perf_counter() - t0

        probe = await run(batch * 8)  # warm-up, and how many samples fill ``seconds``
        n = max(batch * 8, int(batch * 8 * seconds / max(probe, 1e-6)))
        n = min(n - n % batch, MAX_SAMPLES)
        elapsed = await run(n)
        ran_on = engine.device
        for task in servers:
            task.cancel()
    got = np.array([labels[i] for i in range(n)])
    return EngineRun(n / elapsed, n, got, dict(sorted(exits.items())), ran_on)
