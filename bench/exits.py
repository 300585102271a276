"""``make bench-exits``: what early exits save on the digits test split.

For the demo preset and MobileNetV2 width 1.0 (each trained jointly, and again with
distillation and feature transfer off): per-exit test accuracy, final-exit accuracy, and at the
thresholds chosen on the validation split for target = final validation accuracy - 1 point,
the realised test accuracy and mean FLOPs per sample as a fraction of the full model.
Bundles are cached under bundles/bench/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import write_result
from offramp.ml.build import build, preset
from offramp.ml.calibrate import measure
from offramp.ml.loss import LossConfig

ROOT = Path("bundles/bench")


def evaluate(preset_name: str, joint: bool) -> dict[str, Any]:
    recipe = preset(preset_name)
    if not joint:
        recipe = replace(recipe, name=recipe.name + "-ce",
                         train=replace(recipe.train, loss=LossConfig(distill=False, feature=False)))
    out = ROOT / f"{preset_name}-{'joint' if joint else 'ce'}"
    bundle, metrics = build(recipe, out, progress=False)
    from offramp.ml.build import load_data

    val = bundle.calibration()
    test = measure(bundle, load_data(recipe).test)
    target = val.exit_accuracy()[-1] - 0.01
    thr = val.thresholds_for_accuracy("confidence", target)
    realised = test.simulate("confidence", thr)
    return {
        "per_exit_test_accuracy": [round(a, 4) for a in test.exit_accuracy()],
        "final_test_accuracy": round(test.exit_accuracy()[-1], 4),
        "target_accuracy_val": round(target, 4),
        "thresholds": [round(t, 4) for t in thr],
        "realised_test_accuracy": round(realised.accuracy, 4),
        "accuracy_drop_points": round(100 * (test.exit_accuracy()[-1] - realised.accuracy), 2),
        "exit_shares": [round(s, 3) for s in realised.shares],
        "flops_fraction": round(realised.flops_fraction, 4),
        "train_seconds": metrics.get("train_seconds"),
    }


def main() -> None:
    results: dict[str, Any] = {}
    for name in ("demo", "mnv2-digits"):
        for joint in (True, False):
            key = f"{name}/{'joint' if joint else 'ce-only'}"
            results[key] = evaluate(name, joint)
            print(key, results[key], flush=True)
    write_result("exits", {
        "dataset": "digits test split (360 images)", "criterion": "confidence",
        "models": results,
        "flops_fraction": {k: v["flops_fraction"] for k, v in results.items()},
        "goal": {"flops_fraction": "<= 0.5 at target = final - 1 point"},
    })


if __name__ == "__main__":
    main()
