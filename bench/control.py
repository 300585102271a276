"""``make bench-control``: the adaptive control claims, on emulated heterogeneous nodes.

One machine, one run, two bundles: the bench bundle of ``make bench-pipeline`` (MobileNetV2
width 1.0, 32x32 digits, 3 segments; the top-level figures) and EfficientNet-Lite0 transferred
to Fashion-MNIST (96x96, 4 segments; under ``fashion``). Three workers at speed factors 1, 2
and 4 (compute slowed 2x, 4x and 8x, which also leaves the two cores to the broker and the
other services); every worker may host every segment and follows the priority-scheduler's
plan.

- rate_gain_at_fixed_accuracy (MDI-Exit claim 1): frames/s served under the ``rate`` strategy
  with exits (target = final accuracy - 1 point) / the same with exits closed; the offered load
  is far above capacity, so the admitted rate is the highest the controller sustains. The
  accuracy of the served frames is reported beside it.
- accuracy_gain_at_fixed_rate (MDI-Exit claim 2): at 1.5x the no-exit capacity, accuracy over
  all offered frames (dropped = wrong), ``threshold`` strategy vs the same thresholds fixed, in
  points. The configured policy (the ceiling) is "exits closed", the most accurate one; the
  floor keeps final accuracy - 5 points. Also reported: the same with the ceiling at the
  thresholds for final accuracy (exits open but strict), which this model's exits already
  carry at that rate.
- priority_latency_reduction (PA-MDI): a high- and a low-priority source together at 1.5x the
  capacity with exits (measured without rate control): 1 - (mean latency of the high one,
  priority-aware) / (same, all weights equal).

Each claim needs an overload its baseline cannot serve; whether it had one is measured in the
same run (``conditions``), and the benchmark fails, after writing its figures, when one was
not met.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Conditions, write_result
from bench.pipeline import ROOT, three_segments
from offramp.local import loadgen
from offramp.local.loadgen import Run, Stream
from offramp.local.system import LocalSystem
from offramp.ml.build import build, preset
from offramp.ml.data import Split, load_dataset
from offramp.model.bundle import Bundle

SPEEDS = (1, 2, 4)  # relative speed of the three workers
BASE_SLOWDOWN = 2.0
SECONDS = 12.0
ENV = {"OFFRAMP_LOG_LEVEL": "warning", "OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "256",
       "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "30", "OFFRAMP_SCHEDULER_SETTLE_S": "1"}


def scenario(bundle: Bundle, env: dict[str, str], streams: list[Stream],
             images: np.ndarray, labels: np.ndarray) -> Run:
    with LocalSystem(bundle, 0, env={**ENV, **env}) as system:
        for i, speed in enumerate(SPEEDS, start=1):
            system.add_worker(f"node-{i}", (), {
                "OFFRAMP_WORKER_SLOWDOWN": str(BASE_SLOWDOWN * max(SPEEDS) / speed),
                "OFFRAMP_WORKER_BATCH_MAX": "16", "OFFRAMP_WORKER_QUEUE_MAX": "256"})
        system.workers = len(SPEEDS)
        return asyncio.run(loadgen.drive(system.url, system.prefix, system.workers, streams,
                                         Split(images, labels), settle_s=60, warmup_s=3.0))


def served(run: Run, source: str | None = None) -> float:
    rs = run.results if source is None else run.by_source(source)
    return sum(1 for r in rs if r.status == "ok") / SECONDS


def summary(run: Run) -> dict[str, Any]:
    from collections import Counter

    ok = [r for r in run.results if r.status == "ok"]
    return {"offered": sum(run.offered.values()), "status": dict(Counter(r.status for r in run.results)),
            "served_fps": round(served(run), 1), "accuracy_served": round(run.accuracy(), 4),
            "accuracy_offered": round(run.accuracy(over_offered=True), 4),
            "exit_shares": {str(k): round(v / max(1, len(ok)), 3)
                            for k, v in sorted(Counter(r.exit_index for r in ok).items())}}


def mean_latency_ms(run: Run, source: str) -> float:
    lat = [r.latency_ms["total"] for r in run.by_source(source) if r.status == "ok" and r.latency_ms]
    return round(float(np.mean(lat)), 2) if lat else float("nan")


OVERLOADED = 0.95  # a run is overloaded when it serves less than this share of what it is offered


def overloaded(run: Run) -> bool:
    return served(run) * SECONDS < OVERLOADED * sum(run.offered.values())


def claims(bundle: Bundle, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every claim on one bundle, with the load condition each one needs measured beside it
    (``conditions``: name -> met)."""
    closed = {"OFFRAMP_ARBITER_DISABLE_EXITS": "true"}
    final = bundle.calibration().exit_accuracy()[-1]

    def go(env: dict[str, str], streams: list[Stream]) -> Run:
        return scenario(bundle, env, streams, images, labels)

    # capacity without exits and with them: far more offered than served, nothing throttled
    cap_run = go({**closed, "OFFRAMP_CONTROL_STRATEGY": "none"}, [Stream("cam", 400, SECONDS)])
    capacity = served(cap_run)
    cap_exits_run = go({"OFFRAMP_CONTROL_STRATEGY": "none"}, [Stream("cam", 800, SECONDS)])
    cap_exits = served(cap_exits_run)

    # claim 1: rate adaptation, with and without exits, offered 3x capacity
    flood = [Stream("cam", 3 * capacity, SECONDS)]
    rate_closed = go({**closed, "OFFRAMP_CONTROL_STRATEGY": "rate"}, flood)
    rate_exits = go({"OFFRAMP_CONTROL_STRATEGY": "rate"}, flood)

    # claim 2: 1.5x the no-exit capacity, threshold adaptation vs the same thresholds fixed
    busy = [Stream("cam", 1.5 * capacity, SECONDS)]
    fixed = go({**closed, "OFFRAMP_CONTROL_STRATEGY": "none"}, busy)
    adaptive = go({**closed, "OFFRAMP_CONTROL_STRATEGY": "threshold"}, busy)
    strict = {"OFFRAMP_ARBITER_TARGET_DROP": "0"}
    fixed_strict = go({**strict, "OFFRAMP_CONTROL_STRATEGY": "none"}, busy)
    adaptive_strict = go({**strict, "OFFRAMP_CONTROL_STRATEGY": "threshold"}, busy)

    # PA-MDI: high + low priority at 1.5x the capacity with exits (measured unthrottled: the
    # rate controller's admitted rate is below it, and 1.2x of that was no overload)
    pair = [Stream("urgent", 0.75 * cap_exits, SECONDS), Stream("bulk", 0.75 * cap_exits, SECONDS)]
    with tempfile.TemporaryDirectory() as tmp:
        aware_file, blind_file = Path(tmp, "aware.toml"), Path(tmp, "blind.toml")
        aware_file.write_text("[sources.urgent]\npriority = 8\n[sources.bulk]\npriority = 1\n")
        blind_file.write_text("[sources.urgent]\npriority = 1\n[sources.bulk]\npriority = 1\n")
        aware = go({"OFFRAMP_SOURCES_FILE": str(aware_file)}, pair)
        blind = go({"OFFRAMP_SOURCES_FILE": str(blind_file)}, pair)

    plans = [{n: [r.segment for r in refs] for n, refs in p.nodes.items()} for _, p in aware.plans]
    return {
        "final_exit_accuracy": round(final, 4),
        "capacity_no_exits_fps": round(capacity, 1),
        "capacity_exits_fps": round(cap_exits, 1),
        "rate_gain_at_fixed_accuracy": round(served(rate_exits) / max(1e-9, served(rate_closed)), 3),
        "rate": {"exits_closed": summary(rate_closed), "exits_open": summary(rate_exits),
                 "target_accuracy": round(final - 0.01, 4)},
        "accuracy_gain_at_fixed_rate": round(100 * (adaptive.accuracy(over_offered=True)
                                                    - fixed.accuracy(over_offered=True)), 2),
        "threshold": {"offered_fps": round(1.5 * capacity, 1), "fixed": summary(fixed),
                      "adaptive": summary(adaptive),
                      "strict_ceiling_gain_points": round(
                          100 * (adaptive_strict.accuracy(over_offered=True)
                                 - fixed_strict.accuracy(over_offered=True)), 2),
                      "strict_ceiling": {"fixed": summary(fixed_strict),
                                         "adaptive": summary(adaptive_strict)}},
        "priority_latency_reduction": round(1 - mean_latency_ms(aware, "urgent")
                                            / mean_latency_ms(blind, "urgent"), 3),
        "priority": {"offered_fps_each": round(0.75 * cap_exits, 1),
                     "aware_ms": {s: mean_latency_ms(aware, s) for s in ("urgent", "bulk")},
                     "blind_ms": {s: mean_latency_ms(blind, s) for s in ("urgent", "bulk")},
                     "aware": summary(aware), "blind": summary(blind),
                     "last_plan": plans[-1] if plans else {}},
        # what each claim needs: an overload the baseline cannot serve
        "conditions": {
            "rate: the exits-closed run is overloaded": overloaded(rate_closed),
            "threshold: the fixed-threshold run is overloaded": overloaded(fixed),
            "priority: the priority-blind run is overloaded": overloaded(blind),
        },
    }


def main() -> None:
    conditions = Conditions.now()
    digits = claims(three_segments(), *_split(preset("mnv2-digits")))
    fashion_recipe = preset("effnet-fashion")
    fashion_bundle, _ = build(fashion_recipe, ROOT / "effnet-fashion-joint", progress=False)
    fashion = claims(fashion_bundle, *_split(fashion_recipe))
    unmet = [f"{name}: {cond}" for name, result in (("digits", digits), ("fashion", fashion))
             for cond, met in result["conditions"].items() if not met]
    write_result("control", {
        "model": "mobilenetv2 width 1.0, 32x32 digits, 3 segments; 3 workers at speed 1, 2, 4",
        **digits,
        "fashion": {"model": "efficientnet_lite0 transferred, 96x96 Fashion-MNIST, 4 segments",
                    **fashion},
        "fashion_rate_gain_at_fixed_accuracy": fashion["rate_gain_at_fixed_accuracy"],
        "fashion_accuracy_gain_at_fixed_rate": fashion["accuracy_gain_at_fixed_rate"],
        "fashion_priority_latency_reduction": fashion["priority_latency_reduction"],
        "unmet_conditions": unmet,
        "goals": {"rate_gain_at_fixed_accuracy": ">= 2.0",
                  "accuracy_gain_at_fixed_rate": ">= +10 points",
                  "priority_latency_reduction": ">= 0.6"},
    }, conditions)
    if unmet:
        raise SystemExit("bench-control: a claim's load condition was not met, so its figure "
                         f"says nothing: {'; '.join(unmet)}")


def _split(recipe: Any) -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset(recipe.dataset, recipe.data_dir, recipe.input_size, recipe.train.seed,
                        splits=("test",)).test
    return test.images[:2000], test.labels[:2000]


if __name__ == "__main__":
    main()
