"""``make bench-gpu``: the worker's GPU path against the monolithic model, on one GPU.

For MobileNetV2 (width 1.0, 32x32) and ResNet-50 (224x224), random weights (weights do not
change speed), each cut at every exit, at batch 1, 8 and 32, images per second of:

- ``monolithic``: the whole exported model, fed numpy arrays (the plain way);
- ``chain_plain``: the segments one after another as the worker ran them before activations
  stayed on the device: numpy in, numpy out, twice across PCIe per segment;
- ``chain_resident``: IO binding, activations kept on the GPU between segments;
- ``chain_cuda_graph``: resident, fixed buffers at the batch, one CUDA graph per segment;
- ``chain_tensorrt_fp16``: resident, TensorRT fp16 engines (batch 8 only: engine builds take
  minutes), where ONNX Runtime's TensorRT provider loads;
- ``worker``: the segment-worker's own engine hosting the whole chain, exits closed, no broker
  (queues, micro-batching, exit decisions, hand-overs: everything but the bus).

Goals (top-level keys): ``chain_ratio_224_b8`` (worker / monolithic, ResNet-50, batch 8) >= 0.95
and ``b1_speedup_vs_plain`` (worker / monolithic, MobileNetV2, batch 1) >= 1.5. About 5 minutes
on an H100. Settings: ``OFFRAMP_BENCH_DEVICE`` (cuda; cpu for a dry run, which writes
``gpu-cpu.json``), ``OFFRAMP_BENCH_SECONDS`` per figure (1.5), ``OFFRAMP_BENCH_GPU_MODELS``
(mnv2-32,resnet50-224), ``OFFRAMP_BENCH_BATCHES`` (1,8,32).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import rate, write_result
from offramp.bus import Topics
from offramp.ml.export import export_bundle
from offramp.ml.zoo import create_model
from offramp.model.bundle import Bundle
from offramp.model.inputs import InputSpec
from offramp.model.providers import GpuOptions
from offramp.model.sessions import FullModelRunner, SegmentRunner
from offramp.node.peers import PeerTable
from offramp.wire import DoneReport, Sample
from segment_worker.engine import Engine
from segment_worker.queue import Item
from segment_worker.settings import EngineConfig

MODELS = {"mnv2-32": ("mobilenetv2", {"width": 1.0}, 32), "resnet50-224": ("resnet50", {}, 224)}
VARIANTS = ("monolithic", "chain_plain", "chain_resident", "chain_cuda_graph",
            "chain_tensorrt_fp16", "worker")
Step = Callable[[], object]


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def make_bundle(key: str, root: Path) -> Bundle:
    arch, cfg, size = MODELS[key]
    torch.manual_seed(0)
    model = create_model(arch, 10, input_size=size, **cfg).eval()
    return export_bundle(model, root / key, name=f"bench-{key}", classes=list("0123456789"),
                         spec=InputSpec(height=size, width=size))


def _chain(runners: list[SegmentRunner], x: np.ndarray, resident: bool) -> Step:
    rows = list(x)

    def step() -> None:
        if not resident:
            h = x
            for r in runners:
                out = r.run(h)
                h = out.activation if out.activation is not None else h
            return
        xs: list[Any] = rows
        for r in runners:
            got = r.run_rows(xs)
            if got.activation is not None:
                xs = r.keep(got.activation, range(len(xs)))
    return step


def chain_step(bundle: Bundle, variant: str, device: str, batch: int, x: np.ndarray,
               cache: str) -> tuple[Step | None, str]:
    """The step of one chain variant, or None and why it cannot run here."""
    resident = variant != "chain_plain"
    static = batch if variant in ("chain_cuda_graph", "chain_tensorrt_fp16") else 0
    on = "tensorrt" if variant == "chain_tensorrt_fp16" else device
    if on == "tensorrt" and batch != 8:
        return None, "TensorRT is measured at batch 8 only"
    if variant == "chain_cuda_graph" and device == "cpu":
        return None, "CUDA graphs need a GPU"
    gpu = GpuOptions(cuda_graph=variant != "chain_resident", trt_cache=cache)
    runners = [SegmentRunner(bundle, s.index, device=on, gpu=gpu, static_batch=static,
                             resident=resident, threads=os.cpu_count() or 1)
               for s in bundle.manifest.segments]
    if runners[0].device != on:
        return None, f"{on} did not load (ONNX Runtime gave {runners[0].providers})"
    return _chain(runners, x, resident), ""


def worker_rate(bundle: Bundle, device: str, batch: int, x: np.ndarray,
                seconds: float) -> float:
    """The worker's engine hosting every segment, exits closed: samples in at segment 1,
    completions counted as the engine reports them."""
    return asyncio.run(_worker(bundle, device, batch, x, seconds))


async def _worker(bundle: Bundle, device: str, batch: int, x: np.ndarray,
                  seconds: float) -> float:
    done = 0
    finished = asyncio.Event()
    target = 0

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        nonlocal done
        done += len(DoneReport.decode(payload).completions)
        if target and done >= target:
            finished.set()

    cfg = EngineConfig(node="bench", batch_max=batch, batch_wait_s=0.0, queue_max=1 << 16,
                       device=device, threads=os.cpu_count() or 1,
                       resident=device != "cpu", gpu=GpuOptions())
    loop = asyncio.get_running_loop()
    async with Engine(bundle, cfg, Topics("bench"), PeerTable("bench"), publish) as engine:
        for s in bundle.manifest.segments:
            engine.host(s.index, await loop.run_in_executor(None, engine.load, s.index))
        stop = asyncio.Event()
        servers = [asyncio.create_task(engine.serve(s.index, stop))
                   for s in bundle.manifest.segments]

        async def run(n: int) -> float:
            nonlocal done, target
            done, target = 0, n
            finished.clear()
            now = time.time()
            items = [Item(Sample(task_id=f"t{i}", source="bench", frame_id=f"f{i}",
                                 created=now), x[i % len(x)], None, now) for i in range(n)]
            t0 = time.perf_counter()
            engine.enqueue(1, items)
            await asyncio.wait_for(finished.wait(), 600)
            return time.perf_counter() - t0

        probe = await run(batch * 8)  # warm-up, and how many samples fill ``seconds``
        n = max(batch * 8, int(batch * 8 * seconds / max(probe, 1e-6)))
        n = min(n - n % batch, 1 << 15)
        elapsed = await run(n)
        for task in servers:
            task.cancel()
    return n / elapsed


def measure(key: str, bundle: Bundle, device: str, batch: int, seconds: float,
            cache: str) -> dict[str, Any]:
    size = MODELS[key][2]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    row: dict[str, Any] = {}
    full = FullModelRunner(bundle, device=device, threads=os.cpu_count() or 1)
    row["monolithic"] = round(rate(lambda: full.run(x), batch, seconds), 1)
    for variant in VARIANTS[1:-1]:
        step, why = chain_step(bundle, variant, device, batch, x, cache)
        row[variant] = round(rate(step, batch, seconds), 1) if step else why
    row["worker"] = round(worker_rate(bundle, device, batch, x, seconds), 1)
    return row


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"{'model':<14}{'batch':>6}" + "".join(f"{v:>22}" for v in VARIANTS)]
    for key, rows in results.items():
        for batch, row in rows.items():
            cells = "".join(f"{row[v]:>22.1f}" if isinstance(row[v], float) else f"{'-':>22}"
                            for v in VARIANTS)
            lines.append(f"{key:<14}{batch:>6}{cells}")
    return "\n".join(lines) + "\n(images per second; - : not measured, see the JSON)"


def main() -> None:
    device = os.environ.get("OFFRAMP_BENCH_DEVICE", "cuda")
    seconds = float(os.environ.get("OFFRAMP_BENCH_SECONDS", "1.5"))
    models = _env_list("OFFRAMP_BENCH_GPU_MODELS", ",".join(MODELS))
    batches = [int(b) for b in _env_list("OFFRAMP_BENCH_BATCHES", "1,8,32")]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            bundle = make_bundle(key, Path(tmp))
            probe = SegmentRunner(bundle, 1, device=device)
            if probe.device != device:
                raise SystemExit(f"asked for {device}, ONNX Runtime gave {probe.providers}")
            results[key] = {}
            for batch in batches:
                results[key][str(batch)] = measure(key, bundle, device, batch, seconds,
                                                   str(Path(tmp) / "trt"))
                print(key, batch, results[key][str(batch)], flush=True)
    print(table(results))

    def ratio(key: str, batch: str) -> float | None:
        row = results.get(key, {}).get(batch)
        return round(row["worker"] / row["monolithic"], 3) if row else None

    write_result("gpu" if device == "cuda" else f"gpu-{device}", {
        "device": device, "onnxruntime_providers": probe.providers,
        "chain_ratio_224_b8": ratio("resnet50-224", "8"),
        "b1_speedup_vs_plain": ratio("mnv2-32", "1"),
        "img_per_s": results,
        "goal": {"chain_ratio_224_b8": ">= 0.95", "b1_speedup_vs_plain": ">= 1.5"},
        "note": "worker = the segment-worker's engine hosting every segment, exits closed, no "
                "broker; chain_* compute every exit head, monolithic only the final one",
    })


if __name__ == "__main__":
    main()
