"""``make bench-exits``: what early exits save, on digits and on Fashion-MNIST.

For each model (trained jointly, and again with distillation and feature transfer off, the
DistrEE ablation): per-exit test accuracy, final-exit accuracy, and at the thresholds chosen on
the validation split for target = final validation accuracy - 1 point, the realised test
accuracy, exit shares and mean FLOPs per sample as a fraction of the full model (and
``curve``: realised test accuracy against mean FLOPs as the budget moves from 0.1 to 1); for
the joint model, the same under the feature-difference criterion beside confidence.

For MobileNetV2 on Fashion-MNIST also the joint loss with a separately trained teacher (the
cross-entropy-only model of the same run, ``--teacher``), DistrEE's own setting: the ``taught``
row. EfficientNet-Lite0 has none: its heads train on a frozen backbone, which a teacher does not
fit.

Models: ``demo`` and ``mnv2-digits`` (digits), ``mnv2-fashion`` (MobileNetV2 width 1.0 from
scratch, 32x32) and ``effnet-fashion`` (EfficientNet-Lite0 with ImageNet weights, exits on the
frozen backbone). ``OFFRAMP_BENCH_EXITS=effnet-fashion,demo`` runs some of them only; the
others are listed under ``not_run``. Bundles are cached under bundles/bench/.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Conditions, write_result
from offramp.ml.build import build, load_data, preset
from offramp.ml.calibrate import measure
from offramp.ml.loss import LossConfig
from offramp.model.calibration import Calibration

ROOT = Path("bundles/bench")
MODELS = ("demo", "mnv2-digits", "mnv2-fashion", "effnet-fashion")
FASHION = {"mnv2-fashion": "fashion_mnv2", "effnet-fashion": "fashion_effnet"}
TAUGHT = ("mnv2-fashion",)  # trains the whole network, so a separate teacher fits
VARIANTS = {"joint": "joint", "ce": "ce-only", "taught": "taught"}  # bundle suffix: result key
CRITERIA = ("confidence", "feature-difference")


def bundle_dir(preset_name: str, variant: str) -> Path:
    return ROOT / f"{preset_name}-{variant}"


def evaluate(preset_name: str, variant: str) -> dict[str, Any]:
    """``variant``: ``joint`` (self-distillation), ``ce`` (cross-entropy only) or ``taught``
    (joint, the ``ce`` model as teacher; build ``ce`` first)."""
    recipe = preset(preset_name)
    joint = variant != "ce"
    if variant == "ce":
        recipe = replace(recipe, name=recipe.name + "-ce",
                         train=replace(recipe.train, loss=LossConfig(distill=False, feature=False)))
    if variant == "taught":
        recipe = replace(recipe, name=recipe.name + "-taught",
                         teacher=str(bundle_dir(preset_name, "ce") / "model.pt"))
    out = bundle_dir(preset_name, variant)
    bundle, metrics = build(recipe, out, progress=False)
    val = bundle.calibration()
    test_split = load_data(recipe).test
    test = measure(bundle, test_split)
    target = val.exit_accuracy()[-1] - 0.01
    row: dict[str, Any] = {
        "per_exit_test_accuracy": [round(a, 4) for a in test.exit_accuracy()],
        "final_test_accuracy": round(test.exit_accuracy()[-1], 4),
        "test_samples": len(test_split.labels),
        "target_accuracy_val": round(target, 4),
        # a run resumed from a checkpoint counts only its own seconds; the last epoch's
        # seconds say what a whole run costs
        "train_seconds": metrics.get("train_seconds"),
        "resumed_at_epoch": metrics.get("resumed_at_epoch"),
        "last_epoch_seconds": (metrics.get("history") or [{}])[-1].get("seconds"),
    }
    for criterion in CRITERIA if joint else CRITERIA[:1]:
        thr = val.thresholds_for_accuracy(criterion, target)
        realised = test.simulate(criterion, thr)
        row[criterion] = {
            "thresholds": [round(t, 4) for t in thr],
            "realised_test_accuracy": round(realised.accuracy, 4),
            "accuracy_drop_points": round(100 * (test.exit_accuracy()[-1] - realised.accuracy), 2),
            "exit_shares": [round(s, 3) for s in realised.shares],
            "flops_fraction": round(realised.flops_fraction, 4),
        }
    row["flops_fraction"] = row["confidence"]["flops_fraction"]
    row["curve"] = tradeoff(val, test, "confidence")
    return row


def tradeoff(val: Calibration, test: Calibration, criterion: str) -> list[dict[str, float]]:
    """Accuracy against mean FLOPs as the exits' budget moves from 0.1 to 1 of the full model:
    the best thresholds on the validation split for each budget, realised on the test split
    (the papers' accuracy-computation curve; ``make report`` draws it)."""
    points = []
    for budget in np.linspace(0.1, 1.0, 10):
        realised = test.simulate(criterion, val.thresholds_for_budget(criterion, float(budget)))
        points.append({"budget": round(float(budget), 2),
                       "flops_fraction": round(realised.flops_fraction, 4),
                       "accuracy": round(realised.accuracy, 4)})
    return points


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's top-level keys (None for a model that was not run)."""
    out: dict[str, Any] = {}
    gains = []
    for name, key in FASHION.items():
        joint, ce = results.get(f"{name}/joint"), results.get(f"{name}/ce-only")
        out[f"{key}_final_accuracy"] = joint["final_test_accuracy"] if joint else None
        out[f"{key}_flops_fraction"] = joint["flops_fraction"] if joint else None
        if joint and ce:
            gain, se = exit1_gain(joint, ce)
            out[f"{key}_joint_exit1_gain_points"], out[f"{key}_joint_exit1_gain_se_points"] = (
                gain, se)
            gains.append(gain)
        if (taught := results.get(f"{name}/taught")) and ce:
            out[f"{key}_taught_exit1_gain_points"], out[f"{key}_taught_exit1_gain_se_points"] = (
                exit1_gain(taught, ce))
            out[f"{key}_taught_final_accuracy"] = taught["final_test_accuracy"]
    out["fashion_joint_exit1_gain_points"] = round(min(gains), 2) if gains else None
    return out


def exit1_gain(row: dict[str, Any], ce: dict[str, Any]) -> tuple[float, float]:
    """Exit 1's test accuracy over the cross-entropy-only model's, in points, with the
    standard error of a difference of two independent accuracies: a gain within about two of
    them is not one."""
    a, b = row["per_exit_test_accuracy"][0], ce["per_exit_test_accuracy"][0]
    n = row["test_samples"]
    return round(100 * (a - b), 2), round(100 * math.sqrt((a * (1 - a) + b * (1 - b)) / n), 2)


def main() -> None:
    conditions = Conditions.now()
    chosen = [m.strip() for m in os.environ.get("OFFRAMP_BENCH_EXITS", ",".join(MODELS)).split(",")
              if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise SystemExit(f"OFFRAMP_BENCH_EXITS: unknown {unknown}; choose among {MODELS}")
    results: dict[str, Any] = {}
    for name in (m for m in MODELS if m in chosen):
        for variant in ("joint", "ce", "taught") if name in TAUGHT else ("joint", "ce"):
            key = f"{name}/{VARIANTS[variant]}"
            results[key] = evaluate(name, variant)
            print(key, results[key], flush=True)
    write_result("exits", {
        **headline(results),
        "criterion": "confidence (and feature difference for joint models)",
        "datasets": {"digits": "test split (360 images)",
                     "fashion-mnist": "official test split (10,000 images)"},
        "models": results,
        "not_run": [m for m in MODELS if m not in chosen],
        "flops_fraction": {k: v["flops_fraction"] for k, v in results.items()},
        "goal": {"flops_fraction": "<= 0.6 at target = final - 1 point",
                 "fashion_mnv2_final_accuracy": ">= 0.92",
                 "fashion_effnet_final_accuracy": ">= 0.90",
                 "fashion_joint_exit1_gain_points": ">= 2"},
        "teacher": {f"{m}/taught": str(bundle_dir(m, "ce") / "model.pt") for m in TAUGHT
                    if m in chosen},
    }, conditions)


if __name__ == "__main__":
    main()
