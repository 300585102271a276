"""``make bench-overhead``: where a frame's CPU goes, process by process, just under capacity.

The system runs as ``offramp up`` runs it (default settings, its own plan; the bench sets only
the in-flight bounds), fed by open-loop cameras (:mod:`bench.camera`: separate processes,
plain paho, PNG frames at QoS 1). First a short run far over capacity measures what it serves
(``capacity_fps``); then a steady run at LOAD of that for SECONDS. Over the steady run, each
process's CPU time comes from /proc (every service, the broker; the cameras and this process,
which reads the answers, apart as the load generator), and each worker's heartbeat says how
much of its CPU was inside ONNX Runtime's ``run`` (``infer_cpu_s``, the inference thread's
CPU time) and in decoding frames (``decode_cpu_s``). Per ok answer:

- ``core_ms_per_frame``: per process, and ``total`` (services and broker);
- ``inference_core_ms_per_frame`` and ``decode_core_ms_per_frame`` (all workers);
- ``overhead_fraction`` = (total - inference) / total: what the plumbing costs beside the
  model, decoding included.

Before any frame, each process's CPU at rest for IDLE_S (``idle_core_ms_per_s``, and its
``total``): heartbeats, timers and the others' heartbeats read. It is taken once the workers
host the plan and the exit-arbiter has published its exit policy (its start, which hashes the
bundle's graphs and sets the thresholds, took 4 s of CPU at 224x224 and once fell inside the
window). It is spent whatever the load,
so at a low frame rate it weighs on every frame (``idle_share``: its part of the steady run's
CPU).

Two models: the demo bundle (MobileNetV2 on 32x32 digits, 2 workers, as ``offramp up``) and the
224x224 EfficientNet-Lite0 on Fashion-MNIST that ``make bench-links`` builds (``effnet_224``,
3 workers), its frames sent as 28x28 PNG, the camera's own size. ``OFFRAMP_BENCH_OVERHEAD=
digits`` or ``=224`` runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Conditions, write_result
from bench.overload import cpu_seconds, demo_bundle, frames_file, run_phase, service_pids
from offramp.bus import Bus, Topics, from_payload
from offramp.local.client import png_bytes, wait_for_plan
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire import Heartbeat

LOAD = 0.8  # share of the measured capacity offered in the steady run
SECONDS = float(os.environ.get("OFFRAMP_BENCH_OVERHEAD_SECONDS", "20"))
PROBE_S = 8.0  # the run far over capacity that measures it
IDLE_S = 10.0  # the system at rest, its plan applied
ENV = {"OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "100000", "OFFRAMP_ADMISSION_INGEST_QUEUE": "100000",
       "OFFRAMP_LOG_LEVEL": "warning"}


class WorkerStats:
    """The latest heartbeat figures of every worker, read while the bench runs."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, float]] = {}

    async def follow(self, system: LocalSystem) -> None:
        topics = Topics(system.prefix)
        async with Bus(BusSettings(broker_url=system.url), f"bench-overhead-{os.getpid()}") as bus:
            await bus.wait_connected(10)
            states = await bus.subscribe(topics.state_all("worker"), maxsize=1024,
                                         decode=from_payload(Heartbeat.decode))
            async for hb in states:
                if hb.online:
                    self.latest[hb.node] = dict(hb.stats)

    def total(self, key: str) -> float:
        return sum(s.get(key, 0.0) for s in self.latest.values())


async def _idle(system: LocalSystem) -> dict[str, float]:
    """Each process's CPU per second of wall time, no frame sent, after its plan is applied
    and a few heartbeats more (ms per s)."""
    topics = Topics(system.prefix)
    async with Bus(BusSettings(broker_url=system.url), f"bench-overhead-idle-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_plan(bus, topics, 60)
        policy = await bus.subscribe(topics.exit_policy(system.bundle.name), maxsize=8)
        await asyncio.wait_for(policy.get(), 60)  # retained: here as soon as it is published
    await asyncio.sleep(3.0)
    pids = service_pids(system)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    await asyncio.sleep(IDLE_S)
    spent = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    return {**{k: round(1000 * v / IDLE_S, 2) for k, v in sorted(spent.items())},
            "total": round(1000 * sum(spent.values()) / IDLE_S, 2)}


async def _measure(system: LocalSystem, frames: Path, folder: Path, probe_fps: float
                   ) -> dict[str, Any]:
    idle = await _idle(system)
    stats = WorkerStats()
    follower = asyncio.create_task(stats.follow(system))
    try:
        probe = (await run_phase(system, probe_fps, PROBE_S, frames, folder, "probe")).summary()
        capacity = float(probe["ok_fps"])
        await asyncio.sleep(2.0)  # the probe's backlog gone, fresh heartbeats
        before = {k: stats.total(k) for k in ("infer_cpu_s", "decode_cpu_s")}
        phase = await run_phase(system, LOAD * capacity, SECONDS, frames, folder, "steady")
        await asyncio.sleep(1.0)  # a heartbeat after the last frame
        after = {k: stats.total(k) for k in ("infer_cpu_s", "decode_cpu_s")}
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    steady = phase.summary()
    ok = int(steady["status"].get("ok", 0))
    if ok == 0:
        raise SystemExit("bench-overhead: the steady run served nothing")
    generator = {k: phase.cpu_s.pop(k) for k in ("cameras", "bench_reader")}
    per_frame = {k: round(1000 * v / ok, 4) for k, v in sorted(phase.cpu_s.items())}
    total = sum(phase.cpu_s.values())
    infer = after["infer_cpu_s"] - before["infer_cpu_s"]
    decode = after["decode_cpu_s"] - before["decode_cpu_s"]
    return {
        "capacity_fps": capacity, "offered_fps": round(LOAD * capacity, 1),
        "ok_fps": steady["ok_fps"], "frames_ok": ok, "status": steady["status"],
        "core_ms_per_frame": {**per_frame, "total": round(1000 * total / ok, 4)},
        "inference_core_ms_per_frame": round(1000 * infer / ok, 4),
        "decode_core_ms_per_frame": round(1000 * decode / ok, 4),
        "overhead_fraction": round((total - infer) / total, 4),
        "load_generator_core_ms_per_frame": {k: round(1000 * v / ok, 4)
                                             for k, v in generator.items()},
        "cores_busy": round(total / float(steady["span_s"]), 3),
        "idle_core_ms_per_s": idle,
        "idle_share": round(idle["total"] / 1000 * float(steady["span_s"]) / total, 4),
    }


def _run(bundle: Bundle, workers: int, frames: Path, folder: Path, probe_fps: float
         ) -> dict[str, Any]:
    with LocalSystem(bundle, workers, env=ENV) as system:
        figures = asyncio.run(_measure(system, frames, folder, probe_fps))
    return {"model": bundle.name, "workers": workers, **figures}


def _fashion_frames(folder: Path) -> Path:
    from offramp.ml.data import load_fashion_mnist

    images = load_fashion_mnist(size=28, splits=("test",)).test.images[:2000]
    path = folder / "fashion.npz"
    np.savez(path, payloads=np.array([png_bytes(im) for im in images], dtype=object))
    return path


def main() -> None:
    conditions = Conditions.now()
    part = os.environ.get("OFFRAMP_BENCH_OVERHEAD", "all")
    out: dict[str, Any] = {"load_share": LOAD, "seconds": SECONDS,
                           "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="offramp-overhead-") as tmp:
        folder = Path(tmp)
        if part in ("all", "digits"):
            out.update(_run(demo_bundle(), 2, frames_file(folder), folder, 3000.0))
        if part in ("all", "224"):
            from bench.links import ensure_bundle

            out["effnet_224"] = _run(ensure_bundle(), 3, _fashion_frames(folder), folder, 150.0)
    write_result("overhead", out, conditions)


if __name__ == "__main__":
    main()
