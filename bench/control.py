"""``make bench-control``: the adaptive control claims, on emulated heterogeneous nodes.

One machine, one run, two bundles: the bench bundle of ``make bench-pipeline`` (MobileNetV2
width 1.0, 32x32 digits, 3 segments; the top-level figures) and EfficientNet-Lite0 transferred
to Fashion-MNIST (96x96, 4 segments; under ``fashion``). Three workers at speed factors 1, 2
and 4 (compute slowed 2x, 4x and 8x, which also leaves the two cores to the broker and the
other services); every worker may host every segment and follows the priority-scheduler's
plan.

Capacities are searched, not assumed: nothing throttled, the offered rate grows 1.5x a step
from a first guess until a run serves less than 95% of what it is offered, and the highest
served rate of the ladder is the capacity (with exits closed, and with them open). The
claims are then measured REPEATS times (``OFFRAMP_BENCH_CONTROL_REPEATS``, default 3), each
repeat running every claim's baseline and treatment back to back; each key figure is the
median of the repeats, with every repeat's value (``<key>_runs``) and the range
(``<key>_spread``) beside it, and each claim's detail comes from its median repeat.

- rate_gain_at_fixed_accuracy (MDI-Exit claim 1): frames/s served under the ``rate`` strategy
  with exits (target = final accuracy - 1 point) / the same with exits closed; the offered load
  is 3x the capacity without exits, so the admitted rate is the highest the controller
  sustains. The accuracy of the served frames is reported beside it.
- accuracy_gain_at_fixed_rate (MDI-Exit claim 2): at 1.5x the no-exit capacity, accuracy over
  all offered frames (dropped = wrong), ``threshold`` strategy vs the same thresholds fixed, in
  points. The configured policy (the ceiling) is "exits closed", the most accurate one; the
  floor keeps final accuracy - 5 points. Also reported: the same with the ceiling at the
  thresholds for final accuracy (exits open but strict), which this model's exits already
  carry at that rate.
- priority_latency_reduction (PA-MDI, in the paper's setting: several sources, one of them
  time-sensitive): one source of priority 8 and three of priority 1 at equal rates, together
  1.5x the capacity with exits (measured without rate control): 1 - (mean latency of the
  high one, priority-aware) / (same, all weights equal). priority_latency_reduction_two_sources
  is the same with one source of each priority.

Each claim needs an overload its baseline cannot serve, and each capacity a run it could not
keep up with; whether each one had it is measured in the same run (``conditions``: met in
every repeat), and the benchmark fails, after writing its figures, when one was not met.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
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
REPEATS = int(os.environ.get("OFFRAMP_BENCH_CONTROL_REPEATS", "3"))
SEARCH_STEPS = 6  # offers before a capacity search gives up
STEP = 1.5  # each offer of a capacity search over the one before
FIRST_OFFER = 200.0  # frames/s: the capacity search's first guess without exits
ENV = {"OFFRAMP_LOG_LEVEL": "warning", "OFFRAMP_ADMISSION_MAX_IN_FLIGHT": "256",
       "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "30", "OFFRAMP_SCHEDULER_SETTLE_S": "1"}
CLOSED = {"OFFRAMP_ARBITER_DISABLE_EXITS": "true"}
OVERLOADED = 0.95  # a run is overloaded when it serves less than this share of what it is offered
KEYS = ("rate_gain_at_fixed_accuracy", "accuracy_gain_at_fixed_rate",
        "priority_latency_reduction", "priority_latency_reduction_two_sources")
URGENT, LOW = 8, 1  # the priorities of the time-sensitive source and of the others

Go = Callable[[dict[str, str], list[Stream]], Run]


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
    ok = [r for r in run.results if r.status == "ok"]
    return {"offered": sum(run.offered.values()), "status": dict(Counter(r.status for r in run.results)),
            "served_fps": round(served(run), 1), "accuracy_served": round(run.accuracy(), 4),
            "accuracy_offered": round(run.accuracy(over_offered=True), 4),
            "exit_shares": {str(k): round(v / max(1, len(ok)), 3)
                            for k, v in sorted(Counter(r.exit_index for r in ok).items())}}


def mean_latency_ms(run: Run, *sources: str) -> float:
    """Mean latency of the frames of ``sources`` answered ok."""
    lat = [r.latency_ms["total"] for s in sources for r in run.by_source(s)
           if r.status == "ok" and r.latency_ms]
    return round(float(np.mean(lat)), 2) if lat else float("nan")


def overloaded(run: Run) -> bool:
    return served(run) * SECONDS < OVERLOADED * sum(run.offered.values())


def search_capacity(go: Go, env: dict[str, str], offer: float) -> dict[str, Any]:
    """The highest served rate of runs offered ``offer`` frames/s and then STEP times more each
    time, up to the first that could not keep up (``saturated``: whether one could not within
    SEARCH_STEPS offers), with every step's offered and served rates. The highest, not the
    last: far past its capacity a system may serve less than at it (its intake spends the
    cores refusing frames), and a doubling ladder landed there."""
    ladder: list[dict[str, float]] = []
    best = 0.0
    for _ in range(SEARCH_STEPS):
        run = go(env, [Stream("cam", offer, SECONDS)])
        rate = served(run)
        best = max(best, rate)
        ladder.append({"offered_fps": round(offer, 1), "served_fps": round(rate, 1)})
        print(f"bench-control: capacity search, offered {offer:.0f}/s, served {rate:.0f}/s",
              file=sys.stderr, flush=True)
        if overloaded(run):
            return {"fps": best, "ladder": ladder, "saturated": True}
        offer *= STEP
    return {"fps": best, "ladder": ladder, "saturated": False}


def one_repeat(go: Go, capacity: float, cap_exits: float, final: float) -> dict[str, Any]:
    """Every claim's baseline and treatment, once: the key figures, each claim's detail and
    the load condition each one needs."""
    # claim 1: rate adaptation, with and without exits, offered 3x capacity
    flood = [Stream("cam", 3 * capacity, SECONDS)]
    rate_closed = go({**CLOSED, "OFFRAMP_CONTROL_STRATEGY": "rate"}, flood)
    rate_exits = go({"OFFRAMP_CONTROL_STRATEGY": "rate"}, flood)

    # claim 2: 1.5x the no-exit capacity, threshold adaptation vs the same thresholds fixed
    busy = [Stream("cam", 1.5 * capacity, SECONDS)]
    fixed = go({**CLOSED, "OFFRAMP_CONTROL_STRATEGY": "none"}, busy)
    adaptive = go({**CLOSED, "OFFRAMP_CONTROL_STRATEGY": "threshold"}, busy)
    strict = {"OFFRAMP_ARBITER_TARGET_DROP": "0"}
    fixed_strict = go({**strict, "OFFRAMP_CONTROL_STRATEGY": "none"}, busy)
    adaptive_strict = go({**strict, "OFFRAMP_CONTROL_STRATEGY": "threshold"}, busy)

    # PA-MDI: the paper's setting (one time-sensitive source among several), and two sources
    several, two = priorities(go, cap_exits, others=3), priorities(go, cap_exits, others=1)
    return {
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
        "priority_latency_reduction": several["reduction"],
        "priority": several["detail"],
        "priority_latency_reduction_two_sources": two["reduction"],
        "priority_two_sources": two["detail"],
        "conditions": {
            "rate: the exits-closed run is overloaded": overloaded(rate_closed),
            "threshold: the fixed-threshold run is overloaded": overloaded(fixed),
            "priority: the priority-blind run is overloaded": several["overloaded"],
            "priority, two sources: the priority-blind run is overloaded": two["overloaded"],
        },
    }


def priorities(go: Go, cap_exits: float, others: int) -> dict[str, Any]:
    """One time-sensitive source ("urgent", priority URGENT) and ``others`` of priority LOW
    ("bulk-1", ...), at equal rates that together offer 1.5x the capacity with exits (measured
    unthrottled: the rate controller's admitted rate is below it, and 1.2x of that was no
    overload); run priority-aware, then with every weight equal."""
    bulk = tuple(f"bulk-{i}" for i in range(1, others + 1))
    each = 1.5 * cap_exits / (1 + others)
    streams = [Stream(s, each, SECONDS) for s in ("urgent", *bulk)]
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, urgent in (("aware", URGENT), ("blind", LOW)):
            sources = Path(tmp, f"{name}.toml")
            sources.write_text(f"[sources.urgent]\npriority = {urgent}\n" + "".join(
                f"[sources.{s}]\npriority = {LOW}\n" for s in bulk))
            runs[name] = go({"OFFRAMP_SOURCES_FILE": str(sources)}, streams)
    aware, blind = runs["aware"], runs["blind"]
    plans = [{n: [r.segment for r in refs] for n, refs in p.nodes.items()} for _, p in aware.plans]
    return {"reduction": round(1 - mean_latency_ms(aware, "urgent")
                               / mean_latency_ms(blind, "urgent"), 3),
            "overloaded": overloaded(blind),
            "detail": {"sources": 1 + others, "offered_fps_each": round(each, 1),
                       "aware_ms": {"urgent": mean_latency_ms(aware, "urgent"),
                                    "bulk": mean_latency_ms(aware, *bulk)},
                       "blind_ms": {"urgent": mean_latency_ms(blind, "urgent"),
                                    "bulk": mean_latency_ms(blind, *bulk)},
                       "aware": summary(aware), "blind": summary(blind),
                       "last_plan": plans[-1] if plans else {}}}


DETAIL = {"rate_gain_at_fixed_accuracy": "rate", "accuracy_gain_at_fixed_rate": "threshold",
          "priority_latency_reduction": "priority",
          "priority_latency_reduction_two_sources": "priority_two_sources"}


def combine(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats as one result: each key figure's median, every repeat's value and their
    range; each claim's detail from the repeat whose figure is the median (the lower middle
    one for an even count); a condition met only when every repeat met it."""
    out: dict[str, Any] = {"repeats": len(repeats)}
    for key in KEYS:
        values = [r[key] for r in repeats]
        middle = sorted(range(len(values)), key=lambda i: values[i])[(len(values) - 1) // 2]
        out[key] = round(float(np.median(values)), 3)
        out[f"{key}_runs"] = values
        out[f"{key}_spread"] = [min(values), max(values)]
        out[DETAIL[key]] = repeats[middle][DETAIL[key]]
    out["conditions"] = {name: all(r["conditions"][name] for r in repeats)
                         for name in repeats[0]["conditions"]}
    return out


def claims(bundle: Bundle, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every claim on one bundle, REPEATS times, with the load condition each one needs
    measured beside it (``conditions``: name -> met)."""
    final = bundle.calibration().exit_accuracy()[-1]

    def go(env: dict[str, str], streams: list[Stream]) -> Run:
        return scenario(bundle, env, streams, images, labels)

    closed = search_capacity(go, {**CLOSED, "OFFRAMP_CONTROL_STRATEGY": "none"}, FIRST_OFFER)
    opened = search_capacity(go, {"OFFRAMP_CONTROL_STRATEGY": "none"}, STEP * closed["fps"])
    repeats = []
    for i in range(REPEATS):
        print(f"bench-control: repeat {i + 1} of {REPEATS}", file=sys.stderr, flush=True)
        repeats.append(one_repeat(go, closed["fps"], opened["fps"], final))
    result = combine(repeats)
    return {
        "final_exit_accuracy": round(final, 4),
        "capacity_no_exits_fps": round(closed["fps"], 1),
        "capacity_exits_fps": round(opened["fps"], 1),
        "capacity_search": {"no_exits": closed["ladder"], "exits": opened["ladder"]},
        **result,
        "conditions": {"capacity: a run without exits could not keep up": closed["saturated"],
                       "capacity: a run with exits could not keep up": opened["saturated"],
                       **result["conditions"]},
    }


def main() -> None:
    if REPEATS < 1:
        raise SystemExit(f"bench-control: OFFRAMP_BENCH_CONTROL_REPEATS must be at least 1, "
                         f"not {REPEATS}")
    conditions = Conditions.now()
    digits = claims(three_segments(), *_split(preset("mnv2-digits")))
    fashion_recipe = preset("effnet-fashion")
    fashion_bundle, _ = build(fashion_recipe, ROOT / "effnet-fashion-joint", progress=False)
    fashion = claims(fashion_bundle, *_split(fashion_recipe))
    unmet = [f"{name}: {cond}" for name, result in (("digits", digits), ("fashion", fashion))
             for cond, met in result["conditions"].items() if not met]
    fashion_keys = {f"fashion_{key}{suffix}": fashion[f"{key}{suffix}"]
                    for key in KEYS for suffix in ("", "_runs", "_spread")}
    write_result("control", {
        "model": "mobilenetv2 width 1.0, 32x32 digits, 3 segments; 3 workers at speed 1, 2, 4",
        **digits,
        "fashion": {"model": "efficientnet_lite0 transferred, 96x96 Fashion-MNIST, 4 segments",
                    **fashion},
        **fashion_keys,
        "unmet_conditions": unmet,
        "goals": {"rate_gain_at_fixed_accuracy": ">= 2.0",
                  "accuracy_gain_at_fixed_rate": ">= +10 points",
                  "priority_latency_reduction": ">= 0.75"},
    }, conditions)
    if unmet:
        raise SystemExit("bench-control: a load condition was not met, so the figure that "
                         f"needs it says nothing: {'; '.join(unmet)}")


def _split(recipe: Any) -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset(recipe.dataset, recipe.data_dir, recipe.input_size, recipe.train.seed,
                        splits=("test",)).test
    return test.images[:2000], test.labels[:2000]


if __name__ == "__main__":
    main()
