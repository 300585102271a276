"""``make bench-segments``: ONNX Runtime throughput of the chained segments vs the monolithic
exported model (batch 8, CPU, same process, same threads), and ONNX Runtime vs torch eager.

Weights do not change speed, so the model is MobileNetV2 width 1.0 (32x32) exported untrained.
``OFFRAMP_BENCH_DEVICE=cuda`` runs both sessions (and torch) on the GPU instead and writes
``segments-cuda.json``; ``OFFRAMP_BENCH_BATCH`` sets the batch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import Conditions, write_result
from bench.common import rate as throughput
from offramp.ml.export import export_bundle
from offramp.ml.zoo import create_model
from offramp.model.bundle import load_bundle
from offramp.model.inputs import InputSpec
from offramp.model.sessions import FullModelRunner, SegmentRunner

BATCH = int(os.environ.get("OFFRAMP_BENCH_BATCH", "8"))
DEVICE = os.environ.get("OFFRAMP_BENCH_DEVICE", "cpu")
SECONDS = 4.0
THREADS = os.cpu_count() or 2


def rate(fn: Callable[[], object]) -> float:
    return throughput(fn, BATCH, SECONDS, warmup=5)


def main() -> None:
    conditions = Conditions.now()
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10, width=1.0).eval()
    x = np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(model, Path(tmp) / "b", name="bench", classes=list("0123456789"),
                               spec=InputSpec())
        bundle = load_bundle(bundle.root)
        segs = [SegmentRunner(bundle, s.index, device=DEVICE, threads=THREADS)
                for s in bundle.manifest.segments]
        full = FullModelRunner(bundle, device=DEVICE, threads=THREADS)
        if segs[0].device != DEVICE:
            raise SystemExit(f"asked for {DEVICE}, ONNX Runtime gave {segs[0].providers}")

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
        on = "cuda" if DEVICE != "cpu" else "cpu"
        model, xt = model.to(on), torch.from_numpy(x).to(on)
        wait = torch.cuda.synchronize if on == "cuda" else (lambda: None)
        with torch.no_grad():
            torch_rate = rate(lambda: (model(xt), wait()))
        flops_full = bundle.manifest.full_flops
        flops_chain = sum(seg.flops for seg in bundle.manifest.segments)
    full_r, chain_r = max(rates["full"]), max(rates["chain"])
    write_result("segments" if DEVICE == "cpu" else f"segments-{DEVICE}", {
        "model": "mobilenetv2 width 1.0, 32x32, 4 exits -> 4 segments", "batch": BATCH,
        "device": DEVICE, "threads": THREADS, "full_img_per_s": round(full_r, 1),
        "chain_img_per_s": round(chain_r, 1), "chain_ratio": round(chain_r / full_r, 3),
        "flops_bound_ratio": round(flops_full / flops_chain, 3),
        "torch_eager_all_exits_img_per_s": round(torch_rate, 1),
        "onnx_vs_torch_ratio": round(chain_r / torch_rate, 2),
        "goal": {"chain_ratio": ">= 0.95"},
        "note": "the chain computes every exit head; the monolithic model only the final one. "
                "flops_bound_ratio is the chain_ratio that FLOPs alone would allow.",
    }, conditions)


if __name__ == "__main__":
    main()
