"""The 224x224 part of ``make bench-pipeline``: EfficientNet-Lite0 with exits trained on
Fashion-MNIST at 224x224 (the bundle ``make bench-links`` builds and caches under
bundles/bench/links-224: 4 segments, activations of 294, 61 and 86 KiB per frame at its cuts)
on 3 worker processes over the loopback broker, against one ONNX Runtime session with a thread
per core, same run.

- ``pipeline_efficiency``: frames/s with exits closed / the session's frames/s (the session
  timed just before and just after each system run; mean over REPEATS pairs);
- ``exit_speedup``: frames/s with the arbiter's thresholds (target: final accuracy - 1 point) /
  with exits closed, with both accuracies beside it;
- ``wire_bytes_per_frame``: with exits closed, for each worker codec (raw, fp16, int8, ae: the
  autoencoders of ratio 4 where the bundle has them), the activation bytes published per frame
  into each segment (``into_1`` is the admission-controller's first hop: the camera's PNG
  bytes as sent), counted by a client subscribed to every activation topic, and the accuracy
  over the frames answered; ``first_hop_bytes_per_frame`` the same for each first hop:
  ``frames`` (the default: the camera's bytes) and the model input tensor decoded at the
  admission-controller (``OFFRAMP_ADMISSION_FIRST_HOP=tensor``) in each codec (raw, fp16,
  int8). ``first_hop_bytes`` is the default's, beside ``encoded_bytes_per_frame`` (the mean
  size of the frames sent). Those runs carry the observer's extra traffic, so their rates are
  not reported.

- ``imported``: the same model (the bundle's ``full.onnx``, as a user's file) through ``offramp
  import``: exits trained on all 55,000 training images (their 2x2-grid features computed with
  ONNX Runtime, distilled from the model's output), cut near the bundle's own FLOPs shares;
  built once (about 18 minutes here) and cached under bundles/bench. Exits closed
  and open, as above, in the same repeats.
- ``system_vs_monolithic``: frames/s of the imported bundle with exits open (the arbiter's
  thresholds: final accuracy - 1 point) / the session's, with ``accuracy_drop`` beside it
  (the session's accuracy, that of the exits-closed run, minus the exits' realised one);
  ``system_vs_monolithic_zoo`` the same for the bundle's own exits (3,000 images).

The system runs with its own plan (the scheduler's, followed by the workers), as ``offramp
up`` runs it; the bench sets only the load, the in-flight bounds and the micro-batch size.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from typing import Any

import numpy as np

from bench.common import Run, monolithic_rate, summarise
from offramp.bus import Bus, Topics
from offramp.local.client import collect, envelope, publish_frames, wait_for_plan, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.data import load_fashion_mnist
from offramp.ml.onnx_import import ImportOptions, import_onnx
from offramp.model.bundle import Bundle, load_bundle
from offramp.model.images import image_to_input
from offramp.settings import BusSettings
from offramp.wire import ExitPolicy

WORKERS = 3
FRAMES = int(os.environ.get("OFFRAMP_BENCH_PIPELINE_224_FRAMES", "1000"))
REPEATS = 2
BATCH = 8  # micro-batches of 8 x 294 KiB: 2.4 MB packets
CODECS = ("raw", "fp16", "int8", "ae")
FIRST_HOP = ("frames", "raw", "fp16", "int8")  # the camera's bytes, or the tensor in a codec
ENV = {"OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "100000", "OFFRAMP_ADMISSION_INGEST_QUEUE": "100000",
       "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "120",
       "OFFRAMP_ADMISSION_DISPATCH_BATCH": str(BATCH), "OFFRAMP_LOG_LEVEL": "warning"}
IMPORTED_NAME = "fashion-effnet-224-imported"


def ensure_imported(source: Bundle) -> Bundle:
    """``source``'s model imported with exits trained on every training image, built once and
    again when ``source``'s full.onnx changes."""
    from bench.links import ROOT

    out = ROOT / "bundles" / "bench" / "effnet-224-imported"
    model = source.path(source.manifest.full_model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    if (out / "manifest.json").exists():
        cached = load_bundle(out)
        if cached.manifest.config.get("sha256") == digest and cached.manifest.calibration:
            return cached
    flops = np.cumsum([s.flops for s in source.manifest.segments[:-1]])
    spec = source.manifest.input
    print(f"importing {model} with exits trained on all of Fashion-MNIST's training images "
          "(about 18 minutes on 2 cores)", flush=True)
    return import_onnx(ImportOptions(
        model, "fashion-mnist", out, at=tuple(float(f) / source.manifest.full_flops
                                              for f in flops),
        mean=tuple(spec.mean), std=tuple(spec.std), name=IMPORTED_NAME, train_limit=None)).bundle


WORKER_ENV = {"OFFRAMP_WORKER_THREADS": "1", "OFFRAMP_WORKER_BATCH_MAX": str(BATCH)}


async def _drive(system: LocalSystem, payloads: list[bytes],
                 observe: bool) -> tuple[Run, Counter[str]]:
    topics = Topics(system.prefix)
    wire: Counter[str] = Counter()
    async with Bus(BusSettings(broker_url=system.url, publish_timeout_s=60),
                   f"bench-224-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 120)
        await wait_for_plan(bus, topics, 120)  # its segments loaded: the steady state
        pol = await bus.subscribe(topics.exit_policy(system.bundle.name))
        ExitPolicy.decode((await asyncio.wait_for(pol.get(), 30)).payload)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=100_000)
        await publish_frames(bus, topics.ingest("warmup"), payloads[:16], 0)
        await collect(results, 16, 120)

        async def count() -> None:
            async for msg in acts:
                wire[f"into_{msg.topic.split('/act/')[1].split('/')[1]}"] += len(msg.payload)

        counting = None
        if observe:
            acts = await bus.subscribe(f"{system.prefix}/act/#", maxsize=100_000)
            counting = asyncio.create_task(count())
        start = time.time()
        sent = asyncio.create_task(publish_frames(bus, topics.ingest("cam-1"), payloads, 0))
        got = await collect(results, len(payloads), 600)
        await sent
        end = time.time() - (time.perf_counter() - got.last)
        if counting is not None:
            await asyncio.sleep(0.5)  # the last packets' copies
            counting.cancel()
        return Run(got.results, start, end), wire


def _system(bundle: Bundle, payloads: list[bytes], *, exits: bool, codec: str = "auto",
            observe: bool = False, first_hop: str = "frames") -> tuple[Run, Counter[str]]:
    env = {**ENV, "OFFRAMP_ARBITER_DISABLE_EXITS": "false" if exits else "true",
           "OFFRAMP_ADMISSION_FIRST_HOP": "frames" if first_hop == "frames" else "tensor",
           **({} if first_hop == "frames" else {"OFFRAMP_ADMISSION_CODEC": first_hop})}
    worker_env = {**WORKER_ENV, "OFFRAMP_WORKER_CODEC": codec}
    with LocalSystem(bundle, WORKERS, env=env, worker_env=worker_env) as system:
        return asyncio.run(_drive(system, payloads, observe))


def run() -> dict[str, Any]:
    from bench.links import ensure_bundle

    bundle = ensure_bundle()
    test = load_fashion_mnist(size=28, splits=("test",)).test  # the camera's own size
    images, y = test.images[:FRAMES], test.labels[:FRAMES]
    labels = {f"p{i}": int(v) for i, v in enumerate(y)}
    payloads = [envelope(f"p{i}", image=im) for i, im in enumerate(images)]
    x = np.stack([image_to_input(im, bundle.manifest.input) for im in images[:256]])
    imported = ensure_imported(bundle)
    cores = os.cpu_count() or 1
    mono: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("closed", "open", "imp_closed",
                                                             "imp_open")}
    for _ in range(REPEATS):
        mono.append(monolithic_rate(bundle, x, cores, batches=(8, 16)))
        for key, b, exits in (("closed", bundle, False), ("open", bundle, True),
                              ("imp_closed", imported, False), ("imp_open", imported, True)):
            runs[key].append(summarise(_system(b, payloads, exits=exits)[0], labels))
    mono.append(monolithic_rate(bundle, x, cores, batches=(8, 16)))
    closed, opened = runs["closed"], runs["open"]
    wire: dict[str, Any] = {}
    for codec in CODECS:
        if codec == "ae" and not bundle.manifest.autoencoders:
            continue
        result, counted = _system(bundle, payloads, exits=False, codec=codec, observe=True)
        frames = len(result.results)
        per = {k: round(v / frames) for k, v in sorted(counted.items())}
        wire[codec] = {**per, "between_workers": sum(v for k, v in per.items()
                                                     if k != "into_1"),
                       "accuracy": summarise(result, labels)["accuracy"]}
    first_hop: dict[str, Any] = {}
    for codec in FIRST_HOP:
        result, counted = _system(bundle, payloads, exits=False, first_hop=codec, observe=True)
        first_hop[codec] = {"into_1": round(counted["into_1"] / len(result.results)),
                            "accuracy": summarise(result, labels)["accuracy"]}
    return {
        "model": f"{bundle.name}: EfficientNet-Lite0, 224x224 Fashion-MNIST, "
                 f"{bundle.num_segments} segments on {WORKERS} worker processes, CPU",
        "frames": FRAMES, "batch": BATCH,
        "activation_bytes": [s.activation_bytes for s in bundle.manifest.segments[:-1]],
        "monolithic_fps": round(max(mono), 2), "monolithic_fps_runs": [round(m, 2) for m in mono],
        **_closed_and_open(closed, opened, mono),
        "imported": _imported(imported, runs["imp_closed"], runs["imp_open"], mono),
        **_versus(runs["imp_open"], runs["imp_closed"], mono, ""),
        **_versus(opened, closed, mono, "_zoo"),
        "wire_bytes_per_frame": wire,
        "first_hop_bytes_per_frame": first_hop,
        "first_hop_bytes": first_hop["frames"]["into_1"],
        "encoded_bytes_per_frame": round(float(np.mean([len(p) for p in payloads]))),
    }


def _per_repeat(runs: list[dict[str, Any]], mono: list[float]) -> list[float]:
    """Each run's frames/s over the session's, timed just before and just after it."""
    return [r["fps"] / ((mono[i] + mono[i + 1]) / 2) for i, r in enumerate(runs)]


def _closed_and_open(closed: list[dict[str, Any]], opened: list[dict[str, Any]],
                     mono: list[float]) -> dict[str, Any]:
    """The fastest run of each, every run's rate, and the paired ratios: closed over the
    session (``pipeline_efficiency``), open over closed (``exit_speedup``)."""
    efficiency = _per_repeat(closed, mono)
    speedup = [o["fps"] / c["fps"] for c, o in zip(closed, opened, strict=True)]
    return {
        "exits_closed": {**max(closed, key=lambda r: float(r["fps"])),
                         "fps_runs": [c["fps"] for c in closed]},
        "exits_open": {**max(opened, key=lambda r: float(r["fps"])),
                       "fps_runs": [o["fps"] for o in opened]},
        "pipeline_efficiency": round(float(np.mean(efficiency)), 3),
        "pipeline_efficiency_runs": [round(e, 3) for e in efficiency],
        "exit_speedup": round(float(np.mean(speedup)), 3),
        "exit_speedup_runs": [round(s, 3) for s in speedup],
    }


def _versus(opened: list[dict[str, Any]], closed: list[dict[str, Any]], mono: list[float],
            suffix: str) -> dict[str, Any]:
    ratios = _per_repeat(opened, mono)
    drop = max(c["accuracy"] for c in closed) - min(o["accuracy"] for o in opened)
    return {f"system_vs_monolithic{suffix}": round(float(np.median(ratios)), 3),
            f"system_vs_monolithic{suffix}_runs": [round(r, 3) for r in ratios],
            f"accuracy_drop{suffix}": round(drop, 4)}


def _imported(bundle: Bundle, closed: list[dict[str, Any]], opened: list[dict[str, Any]],
              mono: list[float]) -> dict[str, Any]:
    calib = bundle.calibration()
    target = calib.exit_accuracy()[-1] - 0.01
    expected = calib.simulate("confidence", calib.thresholds_for_accuracy("confidence", target))
    return {
        "model": f"{bundle.name}: offramp import of the same full.onnx, exits trained on "
                 f"{bundle.manifest.metrics.get('train_images')} images",
        "cut_flops_shares": [round(float(v), 3) for v in np.cumsum(
            [s.flops for s in bundle.manifest.segments[:-1]]) / bundle.manifest.full_flops],
        "val_exit_accuracy": bundle.manifest.metrics.get("val_exit_accuracy"),
        "expected_flops_fraction": round(float(expected.flops_fraction), 3),
        **_closed_and_open(closed, opened, mono),
    }
