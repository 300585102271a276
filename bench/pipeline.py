"""``make bench-pipeline``: the distributed system against one monolithic ONNX Runtime session.

Same machine, same run, same model: MobileNetV2 width 1.0 on 32x32 digits (trained by the
``mnv2-digits`` preset, cached under bundles/bench), exported as 3 segments on 3 worker
processes (1 intra-op thread each, micro-batches of up to 32), CPU. The monolithic session gets
the better of batch 16 and 32. The system runs as ``offramp up`` runs it: queues and credit at
their shipped bound, the scheduler's own plan followed by the workers, each frame sent as a
PNG that the first worker decodes, and each worker yielding the shared cores to the stages
after it (:mod:`offramp.node.cpushare`).

- pipeline_efficiency: frames/s of the system with exits closed / frames/s of one monolithic
  session given the same total intra-op threads (3, one per worker), as the issue defines it.
  pipeline_efficiency_vs_cores is the stricter ratio against a session with as many threads as
  the machine has cores (2 here), which is the faster one on this machine.
- exit_speedup: frames/s with thresholds for target = final - 1 point / with exits closed,
  with the realised accuracy beside it.
- latency p50/p99 at 50% and 90% of the measured capacity (exits on).

A run's frames/s is its frames over the time from the first frame sent to the last result,
the camera sending as fast as it can: filling and draining the pipeline count, which a longer
run would dilute. (A rate taken in the middle of a run flatters the system: an unpaced camera
sends everything early, so the middle misses the camera's and the ingest's work, and a camera
paced above capacity front-loads that work instead.)

The 224x224 figures (``effnet_224``) come from :mod:`bench.pipeline_224`;
``OFFRAMP_BENCH_PIPELINE=digits`` or ``=224`` runs one part only.

This machine's speed drifts by up to 10% over minutes, so every ratio pairs runs made close
together: session, system with exits closed, system with exits open, session, closed, open,
session. A closed-exit run's efficiency is against the mean of the sessions just before and
after it, an exits-open run's speedup is against the closed-exit run just before it, and each
figure is the mean over the REPEATS pairs. Every run's rates and ratios are in the JSON, with
``fill_s``, the time to the first result. Latency is measured at shares of the fastest
exits-open run.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Conditions, Run, monolithic_rate, summarise, write_result
from offramp.bus import Bus, Topics
from offramp.local.client import collect, envelope, publish_frames, wait_for_plan, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.build import build, load_data, load_trained, preset
from offramp.ml.calibrate import calibrate_bundle
from offramp.ml.data import Split
from offramp.ml.export import export_bundle
from offramp.model.bundle import Bundle, load_bundle
from offramp.settings import BusSettings
from offramp.wire import ExitPolicy

WORKERS = 3
FRAMES = 6000  # about 30 s a run with exits closed: filling and draining weigh little
REPEATS = 2  # (session, exits closed, exits open) rounds; each ratio pairs runs of one round
BATCH = 32  # micro-batch of the workers and of admission's first packets
ROOT = Path("bundles/bench")
ENV = {"OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "100000", "OFFRAMP_ADMISSION_INGEST_QUEUE": "100000",
       "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "120", "OFFRAMP_ADMISSION_DISPATCH_BATCH": str(BATCH),
       "OFFRAMP_LOG_LEVEL": "warning"}
# queues, credit and the plan as shipped: the workers follow the scheduler's plan
WORKER_ENV = {"OFFRAMP_WORKER_THREADS": "1", "OFFRAMP_WORKER_BATCH_MAX": str(BATCH)}


def three_segments() -> Bundle:
    """The trained mnv2-digits model exported with the two cuts that balance FLOPs best."""
    recipe = preset("mnv2-digits")
    trained_dir = ROOT / "mnv2-digits-joint"
    build(recipe, trained_dir, progress=False)
    model = load_trained(trained_dir / "model.pt")
    out = ROOT / "mnv2-digits-3seg"
    if (out / "manifest.json").exists():
        bundle = load_bundle(out)
        if bundle.manifest.calibration:
            return bundle
    full = load_bundle(trained_dir)
    seg_flops = [s.flops for s in full.manifest.segments]
    best = min(itertools.combinations(range(1, len(seg_flops)), 2),
               key=lambda c: max(sum(seg_flops[a:b]) for a, b in
                                 zip((0, *c), (*c, len(seg_flops)), strict=True)))
    bundle = export_bundle(model, out, name="digits-mnv2-3seg", classes=full.manifest.classes,
                           spec=full.manifest.input, cuts=best,
                           metrics={"dataset": "digits"})
    calibrate_bundle(bundle, load_data(recipe).val)
    return load_bundle(out)


async def drive(system: LocalSystem, payloads: list[bytes], rate: float) -> Run:
    topics = Topics(system.prefix)
    async with Bus(BusSettings(broker_url=system.url, publish_timeout_s=60),
                   "bench-client") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        await wait_for_plan(bus, topics, 60)  # its segments loaded: the steady state
        pol = await bus.subscribe(topics.exit_policy(system.bundle.name))
        ExitPolicy.decode((await asyncio.wait_for(pol.get(), 30)).payload)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=1_000_000)
        await publish_frames(bus, topics.ingest("warmup"), payloads[:64], 0)  # warm sessions
        await collect(results, 64, 60)
        start = time.time()
        sent = asyncio.create_task(publish_frames(bus, topics.ingest("cam-1"), payloads, rate))
        got = await collect(results, len(payloads), 300)
        await sent
        return Run(got.results, start, time.time() - (time.perf_counter() - got.last))


def run_system(bundle: Bundle, payloads: list[bytes], rate: float, exits: bool) -> Run:
    env = {**ENV, "OFFRAMP_ARBITER_DISABLE_EXITS": "false" if exits else "true"}
    with LocalSystem(bundle, WORKERS, env=env, worker_env=WORKER_ENV) as system:
        return asyncio.run(drive(system, payloads, rate))


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of a configuration's runs, with every run's rate."""
    return {**max(runs, key=lambda r: float(r["fps"])), "fps_runs": [r["fps"] for r in runs]}


def main() -> None:
    conditions = Conditions.now()
    parts = [p.strip() for p in os.environ.get("OFFRAMP_BENCH_PIPELINE", "digits,224").split(",")]
    if unknown := set(parts) - {"digits", "224"}:
        raise SystemExit(f"OFFRAMP_BENCH_PIPELINE: unknown {sorted(unknown)}; digits and/or 224")
    out: dict[str, Any] = digits() if "digits" in parts else {}
    if "224" in parts:
        from bench import pipeline_224

        out["effnet_224"] = pipeline_224.run()
    write_result("pipeline", out, conditions)


def digits() -> dict[str, Any]:
    bundle = three_segments()
    test: Split = load_data(preset("mnv2-digits")).test
    reps = -(-FRAMES // len(test))
    images = np.concatenate([test.images] * reps)[:FRAMES]
    y = np.concatenate([test.labels] * reps)[:FRAMES]
    labels = {f"b{i}": int(v) for i, v in enumerate(y)}
    payloads = [envelope(f"b{i}", image=im) for i, im in enumerate(images)]
    from offramp.model.inputs import normalise

    x = normalise(images, bundle.manifest.input)
    cores = os.cpu_count() or 1
    threads = sorted({WORKERS, cores})
    # Session, system, session, system, session: each closed-exit run is compared with the
    # session timed just before and just after it (this machine's speed drifts by 10% over
    # minutes, so a best-of on each side could pair a fast minute with a slow one).
    mono_runs: dict[int, list[float]] = {t: [] for t in threads}
    closed_runs, open_runs = [], []
    for _ in range(REPEATS):
        for t in threads:
            mono_runs[t].append(monolithic_rate(bundle, x, t))
        closed_runs.append(summarise(run_system(bundle, payloads, 0, exits=False), labels))
        open_runs.append(summarise(run_system(bundle, payloads, 0, exits=True), labels))
    for t in threads:
        mono_runs[t].append(monolithic_rate(bundle, x, t))
    ratios = {t: [run["fps"] / ((v[i] + v[i + 1]) / 2) for i, run in enumerate(closed_runs)]
              for t, v in mono_runs.items()}
    speedups = [o["fps"] / c["fps"] for c, o in zip(closed_runs, open_runs, strict=True)]
    closed = fastest(closed_runs)
    opened = fastest(open_runs)
    mono = {t: max(v) for t, v in mono_runs.items()}
    served = opened["fps"]
    loads = {}
    for share in (0.5, 0.9):
        n = int(min(FRAMES, served * share * 8))
        loads[f"{int(share * 100)}%"] = summarise(
            run_system(bundle, payloads[:n], served * share, exits=True), labels)
    return {
        "model": "mobilenetv2 width 1.0, 32x32 digits, 3 segments on 3 worker processes, CPU",
        "segments": [[s.first_block, s.last_block] for s in bundle.manifest.segments],
        "monolithic_fps": {f"{t}_threads": round(v, 1) for t, v in mono.items()},
        "monolithic_fps_runs": {f"{t}_threads": [round(r, 1) for r in v]
                                for t, v in mono_runs.items()},
        "exits_closed": closed, "exits_open": opened,
        "pipeline_efficiency": round(sum(ratios[WORKERS]) / REPEATS, 3),
        "pipeline_efficiency_runs": [round(r, 3) for r in ratios[WORKERS]],
        "pipeline_efficiency_vs_cores": round(sum(ratios[cores]) / REPEATS, 3),
        "exit_speedup": round(sum(speedups) / REPEATS, 3),
        "exit_speedup_runs": [round(r, 3) for r in speedups],
        "realised_accuracy_with_exits": opened["accuracy"],
        "accuracy_without_exits": closed["accuracy"],
        "latency_at_load": {k: {"offered_fps": round(served * float(k[:-1]) / 100, 1),
                                "p50_ms": v["latency_p50_ms"], "p99_ms": v["latency_p99_ms"],
                                "status": v["status"]} for k, v in loads.items()},
        "goals": {"pipeline_efficiency": ">= 0.85", "exit_speedup": ">= 2.0"},
    }


if __name__ == "__main__":
    main()
