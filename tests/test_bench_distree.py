"""``make bench-distree``'s sweep: every setting under every seed, each paired with the
cross-entropy-only run of the same seed; runs kept by recipe digest and read back; its settings
checked; and one real training run, short, on digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.distree import (
    BASELINE,
    DEFAULT,
    SETTINGS,
    Budget,
    env_number,
    paired_gain,
    run_one,
    summarise,
    sweep,
)
from offramp.ml.build import Recipe
from offramp.ml.loss import LossConfig


def _figures(acc: list[float]) -> dict[str, Any]:
    return {"test_exit_accuracy": acc, "val_exit_accuracy": acc, "train_images": 10,
            "test_images": 10, "seconds": 0.0}


def test_a_gain_is_paired_by_seed_with_the_seeds_standard_error() -> None:
    base = [_figures([0.80, 0.9]), _figures([0.70, 0.9]), _figures([0.75, 0.9])]
    runs = [_figures([0.82, 0.9]), _figures([0.73, 0.9]), _figures([0.76, 0.9])]
    gain = paired_gain(runs, base)
    assert gain["runs"] == [2.0, 3.0, 1.0]
    assert gain["points"] == 2.0 and gain["se_points"] == pytest.approx(0.58, abs=0.005)
    # unpaired, the seeds' own spread (10 points) would swamp a 2-point gain; paired it does not
    assert paired_gain(runs, base, exit_index=1)["points"] == 0.0


def test_the_headline_is_the_best_setting_and_the_defaults_are_given_beside_it() -> None:
    settings = [SETTINGS[0], SETTINGS[1], ("temperature 6", LossConfig(temperature=6.0))]
    results = {BASELINE: [_figures([0.80, 0.9]), _figures([0.70, 0.9])],
               DEFAULT: [_figures([0.79, 0.9]), _figures([0.70, 0.9])],
               "temperature 6": [_figures([0.83, 0.9]), _figures([0.71, 0.9])]}
    assert "digits_joint_exit1_gain_points" in summarise(results, settings, "digits")
    out = summarise(results, settings)
    assert out["best_setting"] == "temperature 6"
    assert out["fashion_joint_exit1_gain_points"] == 2.0
    assert out["fashion_joint_exit1_gain_points_runs"] == [3.0, 1.0]
    assert out["default_exit1_gain_points"] == -0.5
    rows = {r["setting"]: r for r in out["settings"]}
    assert "gain_by_exit" not in rows[BASELINE]
    assert rows["temperature 6"]["loss"]["temperature"] == 6.0
    assert rows[DEFAULT]["test_exit_accuracy_mean"] == [0.745, 0.9]


def test_every_run_is_trained_once_and_read_back_by_its_recipe(tmp_path: Path) -> None:
    trained: list[Recipe] = []

    def trainer(recipe: Recipe) -> dict[str, Any]:
        trained.append(recipe)
        return _figures([0.5 + recipe.train.seed / 100, 0.9])

    budget = Budget(seeds=2, epochs=1, train_limit=100, dataset="digits")
    settings = SETTINGS[:3]
    said: list[str] = []
    first = sweep(budget, settings, tmp_path, jobs=1, trainer=trainer, say=said.append)
    assert len(trained) == 6 and len({r.digest() for r in trained}) == 6
    assert [r["test_exit_accuracy"][0] for r in first[DEFAULT]] == [0.5, 0.51]  # seed order
    assert said[0].startswith("distree sweep: 6 runs") and "[6/6]" in said[-1]
    again = sweep(budget, settings, tmp_path, jobs=1, trainer=trainer, say=said.append)
    assert len(trained) == 6 and again == first
    assert "6 kept from an earlier sweep, 0 to train" in said[-1]
    sweep(Budget(seeds=2, epochs=2, train_limit=100, dataset="digits"), settings[:1], tmp_path,
          jobs=1, trainer=trainer, say=said.append)
    assert len(trained) == 8  # another budget is another recipe


@pytest.mark.parametrize(("env", "message"), [
    ({"OFFRAMP_BENCH_DISTREE_SEEDS": "1"}, "SEEDS=1: must be >= 2"),
    ({"OFFRAMP_BENCH_DISTREE_EPOCHS": "six"}, "EPOCHS='six': not a whole number"),
    ({"OFFRAMP_BENCH_DISTREE_TRAIN_LIMIT": "-5"}, "TRAIN_LIMIT=-5: must be >= 0"),
    ({"OFFRAMP_BENCH_DISTREE_JOBS": "0"}, "JOBS=0: must be >= 1"),
])
def test_a_wrong_setting_is_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        Budget.from_env(env)
        env_number(env, "JOBS", 2, 1)


def test_an_unknown_dataset_is_one_clear_error_before_any_run() -> None:
    with pytest.raises(SystemExit, match="bench-distree: unknown dataset 'mnist'"):
        Budget.from_env({"OFFRAMP_BENCH_DISTREE_DATASET": "mnist"})


def test_the_budget_comes_from_the_environment() -> None:
    assert Budget.from_env({}) == Budget() and Budget().key == "fashion"
    budget = Budget.from_env({"OFFRAMP_BENCH_DISTREE_TRAIN_LIMIT": "0",
                              "OFFRAMP_BENCH_DISTREE_SEEDS": "5",
                              "OFFRAMP_BENCH_DISTREE_DATASET": "digits"})
    assert budget.train_limit is None and budget.seeds == 5  # 0: every training image
    assert budget.key == "digits"  # another dataset's sweep never reads as Fashion-MNIST's


@pytest.mark.tier("inproc")
def test_one_run_trains_the_model_and_measures_every_exit_on_the_test_split() -> None:
    recipe = Budget(epochs=1, train_limit=200, dataset="digits").recipe(LossConfig(), seed=0)
    figures = run_one(recipe)
    assert figures["train_images"] == 200 and figures["test_images"] == 360
    assert len(figures["test_exit_accuracy"]) == 4
    assert all(0.0 <= a <= 1.0 for a in figures["test_exit_accuracy"])
    assert figures["seconds"] > 0
