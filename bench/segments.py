"""``make bench-segments``: ONNX Runtime throughput of the chained segments vs the monolithic
exported model (batch 8, CPU, same process, same threads), and ONNX Runtime vs torch eager.

Weights do not change speed, so the model is MobileNetV2 width 1.0 (32x32) exported untrained.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import write_result
from offramp.bundle import load_bundle
from offramp.ml.export import export_bundle
from offramp.ml.zoo import create_model
from offramp.preprocess import InputSpec
from offramp.runtime import FullModelRunner, SegmentRunner

BATCH = 8
SECONDS = 4.0
THREADS = os.cpu_count() or 2


def rate(fn: Callable[[], object]) -> float:
    for _ in range(5):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        fn()
        n += 1
    return n * BATCH / (time.perf_counter() - t0)


def main() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10, width=1.0).eval()
    x = np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(model, Path(tmp) / "b", name="bench", classes=list("0123456789"),
                               spec=InputSpec())
        bundle = load_bundle(bundle.root)
        segs = [SegmentRunner(bundle, s.index, threads=THREADS) for s in bundle.manifest.segments]
        full = FullModelRunner(bundle, threads=THREADS)

        def chain() -> None:
            h = x
            for runner in segs:
                out = runner.run(h)
                if out.activation is not None:
                    h = out.activation

        rates = {}
        for _ in range(2):  # interleave to share the machine's noise
            rates.setdefault("full", []).append(rate(lambda: full.run(x)))
            rates.setdefault("chain", []).append(rate(chain))
        torch.set_num_threads(THREADS)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            torch_rate = rate(lambda: model(xt))
        flops_full = bundle.manifest.full_flops
        flops_chain = sum(seg.flops for seg in bundle.manifest.segments)
    full_r, chain_r = max(rates["full"]), max(rates["chain"])
    write_result("segments", {
        "model": "mobilenetv2 width 1.0, 32x32, 4 exits -> 4 segments", "batch": BATCH,
        "threads": THREADS, "full_img_per_s": round(full_r, 1),
        "chain_img_per_s": round(chain_r, 1), "chain_ratio": round(chain_r / full_r, 3),
        "flops_bound_ratio": round(flops_full / flops_chain, 3),
        "torch_eager_all_exits_img_per_s": round(torch_rate, 1),
        "onnx_vs_torch_ratio": round(chain_r / torch_rate, 2),
        "goal": {"chain_ratio": ">= 0.95"},
        "note": "the chain computes every exit head; the monolithic model only the final one. "
                "flops_bound_ratio is the chain_ratio that FLOPs alone would allow.",
    })


if __name__ == "__main__":
    main()
