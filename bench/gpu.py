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
  (queues, micro-batching, exit decisions, hand-overs: everything but the bus);
- ``worker_stepwise``: the same with OFFRAMP_WORKER_RUN_THROUGH=false, one hand-off to the
  inference thread per segment rather than one per micro-batch.

Then ``effnet-224`` (:mod:`bench.gpu_exits`): EfficientNet-Lite0 with exits trained on
Fashion-MNIST, on the worker's engine with exits open and closed against one session of the
whole model, batch 8, with the accuracy of each on the same test frames; and ``ready_s``
(:mod:`bench.gpu_ready`): a real worker process's start until its /readyz says ready, with what
it said on the way.

Goals (top-level keys): ``chain_ratio_224_b8`` (worker / monolithic, ResNet-50, batch 8)
>= 0.95; ``b1_speedup_vs_plain`` (worker / chain_plain, MobileNetV2, batch 1) >= 1.5, with
``b1_worker_vs_monolithic`` (worker / monolithic, same row) beside it;
``effnet_224_exits_vs_monolithic`` (worker with exits open / monolithic, batch 8) >= 1.3;
``ready_s`` reported. The device's name and driver, the onnxruntime version and every provider
that did not load are recorded too. About 3 minutes on an H200. Settings:
``OFFRAMP_BENCH_DEVICE`` (cuda; cpu for a dry run, which writes ``gpu-cpu.json``),
``OFFRAMP_BENCH_SECONDS`` per figure (1.5), ``OFFRAMP_BENCH_GPU_MODELS``
(mnv2-32,resnet50-224,effnet-224), ``OFFRAMP_BENCH_BATCHES`` (1,8,32).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from bench.common import Conditions, rate, write_result
from bench.gpu_engine import engine_run
from bench.gpu_exits import effnet_bundle, effnet_exits
from bench.gpu_ready import ready_time
from offramp.ml.export import export_bundle
from offramp.ml.zoo import create_model
from offramp.model.bundle import Bundle
from offramp.model.inputs import InputSpec
from offramp.model.providers import GpuOptions
from offramp.model.sessions import FullModelRunner, SegmentRunner, installed_providers

MODELS = {"mnv2-32": ("mobilenetv2", {"width": 1.0}, 32), "resnet50-224": ("resnet50", {}, 224)}
VARIANTS = ("monolithic", "chain_plain", "chain_resident", "chain_cuda_graph",
            "chain_tensorrt_fp16", "worker", "worker_stepwise")
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


def measure(key: str, bundle: Bundle, device: str, batch: int, seconds: float,
            cache: str) -> dict[str, Any]:
    size = MODELS[key][2]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    row: dict[str, Any] = {}
    full = FullModelRunner(bundle, device=device, threads=os.cpu_count() or 1)
    row["monolithic"] = round(rate(lambda: full.run(x), batch, seconds), 1)
    for variant in VARIANTS[1:-2]:
        step, why = chain_step(bundle, variant, device, batch, x, cache)
        row[variant] = round(rate(step, batch, seconds), 1) if step else why
    row["worker"] = round(engine_run(bundle, device, batch, x, seconds).img_per_s, 1)
    row["worker_stepwise"] = round(engine_run(bundle, device, batch, x, seconds,
                                              run_through=False).img_per_s, 1)
    return row


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"{'model':<14}{'batch':>6}" + "".join(f"{v:>22}" for v in VARIANTS)]
    for key, rows in results.items():
        for batch, row in rows.items():
            cells = "".join(f"{row[v]:>22.1f}" if isinstance(row[v], float) else f"{'-':>22}"
                            for v in VARIANTS)
            lines.append(f"{key:<14}{batch:>6}{cells}")
    return "\n".join(lines) + "\n(images per second; - : not measured, see the JSON)"


def gpu_facts() -> dict[str, str]:
    """The GPU's name and driver as nvidia-smi gives them ('' where it is not there)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {"gpu": "", "driver": ""}
    name, _, driver = out.partition(",")
    return {"gpu": name.strip(), "driver": driver.strip()}


def ratio(num: Any, den: Any) -> float | None:
    """num / den where both were measured (a variant that could not run holds its reason)."""
    if isinstance(num, float) and isinstance(den, float) and den > 0:
        return round(num / den, 3)
    return None


def main() -> None:
    conditions = Conditions.now()
    device = os.environ.get("OFFRAMP_BENCH_DEVICE", "cuda")
    seconds = float(os.environ.get("OFFRAMP_BENCH_SECONDS", "1.5"))
    models = _env_list("OFFRAMP_BENCH_GPU_MODELS", ",".join([*MODELS, "effnet-224"]))
    batches = [int(b) for b in _env_list("OFFRAMP_BENCH_BATCHES", "1,8,32")]
    threads = os.cpu_count() or 1
    results: dict[str, dict[str, dict[str, Any]]] = {}
    probe: SegmentRunner | None = None
    failed: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """One part of the run; its failure is recorded, and the other parts still measured."""
        try:
            out = fn()
        except Exception as exc:
            traceback.print_exc()
            failed[name] = f"{type(exc).__name__}: {exc}"[-2000:]
            return None
        print(name, out, flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        effnet = (attempt("effnet-224", lambda: effnet_exits(device, seconds, threads))
                  if "effnet-224" in models else None)
        ready = attempt("ready", lambda: ready_time(
            effnet_bundle() if "effnet-224" in models else make_bundle(models[0], Path(tmp)),
            device, 8))
        for key in (m for m in models if m in MODELS):
            bundle = make_bundle(key, Path(tmp))
            probe = SegmentRunner(bundle, 1, device=device)
            if probe.device != device:
                raise SystemExit(f"asked for {device}, ONNX Runtime gave {probe.providers}"
                                 + (f"; {probe.gpu_libraries}" if probe.gpu_libraries else ""))
            results[key] = {}
            for batch in batches:
                got = attempt(f"{key} batch {batch}", partial(
                    measure, key, bundle, device, batch, seconds, str(Path(tmp) / "trt")))
                if got is not None:
                    results[key][str(batch)] = got
        print(table(results), flush=True)

    def row(key: str, batch: str) -> dict[str, Any]:
        return results.get(key, {}).get(batch, {})

    mnv2_b1, resnet_b8 = row("mnv2-32", "1"), row("resnet50-224", "8")
    write_result("gpu" if device == "cuda" else f"gpu-{device}", {
        "device": device, **gpu_facts(), "onnxruntime": ort.__version__,
        "onnxruntime_providers": probe.providers if probe else None,
        "installed_providers": installed_providers(),
        "providers_not_loaded": sorted({v for r in results.values() for b in r.values()
                                        for v in b.values()
                                        if isinstance(v, str) and "did not load" in v}),
        "chain_ratio_224_b8": ratio(resnet_b8.get("worker"), resnet_b8.get("monolithic")),
        "b1_speedup_vs_plain": ratio(mnv2_b1.get("worker"), mnv2_b1.get("chain_plain")),
        "b1_worker_vs_monolithic": ratio(mnv2_b1.get("worker"), mnv2_b1.get("monolithic")),
        "effnet_224_exits_vs_monolithic": effnet["ratios"]["exits_open_vs_monolithic"]
        if effnet else None,
        "ready_s": ready["ready_s"] if ready else None, "failed": failed,
        "img_per_s": results, "effnet_224": effnet, "readiness": ready,
        "goal": {"chain_ratio_224_b8": ">= 0.95", "b1_speedup_vs_plain": ">= 1.5",
                 "effnet_224_exits_vs_monolithic": ">= 1.3"},
        "note": "worker = the segment-worker's engine hosting every segment, no broker; "
                "chain_* compute every exit head, monolithic only the final one; "
                "b1_speedup_vs_plain = worker / chain_plain (MobileNetV2, batch 1), "
                "b1_worker_vs_monolithic = worker / monolithic (same row)",
    }, conditions)
    if failed:
        raise SystemExit(f"parts of the run failed: {', '.join(failed)} (see the JSON)")


if __name__ == "__main__":
    main()
