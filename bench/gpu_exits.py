"""Exits on the GPU at 224x224: EfficientNet-Lite0 with exits trained on Fashion-MNIST (the
bundle ``make bench-links`` builds, ``bundles/bench/links-224``; built here if missing) on the
segment-worker's engine, exits closed and open, against one ONNX Runtime session of the whole
model without exits, at micro-batch 8. ``make bench-gpu``'s ``effnet_224_*`` keys.

Exits open means the thresholds the exit-arbiter would publish by default (the calibrated
ones, final accuracy less a point). Real test images go in, so the rate comes with the accuracy
it was bought at, beside the whole model's on the same answers (the timed run cycles through the
frames, so both are counted over the samples it answered).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.common import rate
from bench.gpu_engine import engine_run
from exit_arbiter.service import ArbiterSettings, make_policy
from offramp.ml.data import load_fashion_mnist
from offramp.model.bundle import Bundle, load_bundle
from offramp.model.images import resize_uint8
from offramp.model.inputs import normalise
from offramp.model.sessions import FullModelRunner

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundles" / "bench" / "links-224"
FRAMES = 512  # test images, cycled (602 KB each as input tensors)
BATCH = 8


def effnet_bundle() -> Bundle:
    if (BUNDLE / "manifest.json").is_file():
        return load_bundle(BUNDLE)
    from bench.links import recipe  # the same recipe bench-links builds and caches
    from offramp.ml.build import build

    print(f"building {BUNDLE} (Fashion-MNIST, 224x224; about half an hour on 2 cores)",
          flush=True)
    bundle, _ = build(recipe(), BUNDLE, progress=True)
    return bundle


def frames(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """The first FRAMES test images as model inputs, and their labels."""
    test = load_fashion_mnist(size=28, splits=("test",)).test
    spec = bundle.manifest.input
    images = resize_uint8(test.images[:FRAMES], spec.height, spec.width)
    return normalise(images, spec), test.labels[:FRAMES]


def effnet_exits(device: str, seconds: float, threads: int) -> dict[str, Any]:
    bundle = effnet_bundle()
    x, y = frames(bundle)
    full = FullModelRunner(bundle, device=device, threads=threads)
    whole = np.concatenate([full.run(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])
    mono = rate(lambda: full.run(x[:BATCH]), BATCH, seconds)
    closed = engine_run(bundle, device, BATCH, x, seconds)
    policy = make_policy(ArbiterSettings(), bundle.calibration(), bundle.name, 1)
    opened = engine_run(bundle, device, BATCH, x, seconds, policy)
    stepwise = engine_run(bundle, device, BATCH, x, seconds, policy, run_through=False)
    seen = np.arange(opened.samples) % len(y)  # the frames the timed run answered
    truth, plain = y[seen], whole.argmax(1)[seen]
    return {
        "bundle": bundle.name, "batch": BATCH, "frames": len(x), "device": opened.device,
        "img_per_s": {"monolithic": round(mono, 1), "worker_exits_closed": round(closed.img_per_s, 1),
                      "worker_exits_open": round(opened.img_per_s, 1),
                      "worker_exits_open_stepwise": round(stepwise.img_per_s, 1)},
        "thresholds": [round(t, 4) for t in policy.thresholds],
        "exit_shares": {str(k): round(v / opened.samples, 4) for k, v in opened.exits.items()},
        "accuracy": {"monolithic": round(float((plain == truth).mean()), 4),
                     "worker_exits_open": round(float((opened.labels == truth).mean()), 4),
                     "expected_by_calibration": round(policy.expected_accuracy, 4),
                     "same_label_as_monolithic": round(float((opened.labels == plain).mean()), 4)},
        "ratios": {"exits_open_vs_monolithic": round(opened.img_per_s / mono, 3),
                   "exits_closed_vs_monolithic": round(closed.img_per_s / mono, 3)},
    }
