"""Presets and the ``offramp build`` pipeline: train -> export -> calibrate, cached."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from offramp.ml.calibrate import calibrate_bundle
from offramp.ml.data import Dataset, load_dataset
from offramp.ml.export import export_bundle
from offramp.ml.loss import LossConfig
from offramp.ml.train import TrainConfig, TrainResult, train
from offramp.ml.zoo import ZOO_VERSION, MultiExitNet, create_model
from offramp.model.bundle import Bundle, BundleError, load_bundle
from offramp.model.inputs import InputSpec


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a bundle: model, data, training, cuts."""

    name: str
    model: str
    model_cfg: dict[str, Any]
    dataset: str = "digits"
    data_dir: str | None = None
    input_size: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)
    cuts: tuple[int, ...] = ()

    def digest(self) -> str:
        doc = {"name": self.name, "model": self.model, "cfg": self.model_cfg,
               "dataset": self.dataset, "data_dir": self.data_dir, "size": self.input_size,
               "train": self.train.to_dict(), "cuts": list(self.cuts), "zoo": ZOO_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, Recipe] = {
    # Quick: about 1.5 minutes on 2 CPU cores; what `make demo` serves.
    "demo": Recipe("digits-mnv2-demo", "mobilenetv2", {"width": 0.5, "stem_stride": 2},
                   train=TrainConfig(epochs=15)),
    # The benchmark model: MobileNetV2 width 1.0, CIFAR layout, 32x32 digits.
    "mnv2-digits": Recipe("digits-mnv2", "mobilenetv2", {"width": 1.0},
                          train=TrainConfig(epochs=15)),
}


def preset(name: str, **train_overrides: Any) -> Recipe:
    if name not in PRESETS:
        raise BundleError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    recipe = PRESETS[name]
    if train_overrides:
        loss = train_overrides.pop("loss", recipe.train.loss)
        recipe = replace(recipe, train=replace(recipe.train, loss=loss, **train_overrides))
    return recipe


def make_model(recipe: Recipe, num_classes: int) -> MultiExitNet:
    """The recipe's model, initialised from its seed (so a recipe always trains the same)."""
    torch.manual_seed(recipe.train.seed)
    return create_model(recipe.model, num_classes, input_size=recipe.input_size,
                        **recipe.model_cfg)


def load_data(recipe: Recipe) -> Dataset:
    return load_dataset(recipe.dataset, recipe.data_dir, recipe.input_size,
                        recipe.train.seed)


def cached(out: Path, recipe: Recipe) -> Bundle | None:
    try:
        bundle = load_bundle(out)
    except BundleError:
        return None
    ok = bundle.manifest.metrics.get("recipe") == recipe.digest() and bundle.manifest.calibration
    return bundle if ok else None


def build(recipe: Recipe, out: Path, *, force: bool = False, progress: bool = True
          ) -> tuple[Bundle, dict[str, Any]]:
    """Train, export and calibrate ``recipe`` into ``out``; reuse it when already built."""
    if not force and (bundle := cached(out, recipe)) is not None:
        return bundle, {"cached": True, **bundle.manifest.metrics}
    data = load_data(recipe)
    spec = InputSpec(height=recipe.input_size, width=recipe.input_size)
    model = make_model(recipe, len(data.classes))
    t0 = time.monotonic()
    result: TrainResult = train(model, data, spec, recipe.train,
                                checkpoint=out / ".train" / f"{recipe.digest()}.pt",
                                progress=progress)
    seconds = round(time.monotonic() - t0, 1)
    metrics = {"recipe": recipe.digest(), "preset_name": recipe.name, "dataset": recipe.dataset,
               "train_seconds": seconds, "val_exit_accuracy": result.val_accuracy,
               "test_exit_accuracy": result.test_accuracy, "history": result.history[-1:]}
    bundle = export_bundle(model, out, name=recipe.name, classes=data.classes, spec=spec,
                           cuts=recipe.cuts or None, metrics=metrics)
    torch.save({"model_config": model.config, "num_classes": model.num_classes,
                "state": model.state_dict()}, out / "model.pt")
    calibrate_bundle(bundle, data.val)
    return load_bundle(out), {"cached": False, **metrics}


def load_trained(path: Path) -> MultiExitNet:
    """Rebuild a model saved by ``build`` or ``offramp train`` (``model.pt``)."""
    if not path.is_file():
        raise BundleError(f"trained model {path} is missing (run offramp train or build first)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = dict(state["model_config"])
    name = cfg.pop("name")
    exits = cfg.pop("exits")
    cfg.pop("stage_ends", None)
    cfg.setdefault("head_grid", 1)  # saved before exit heads pooled to a grid
    model = create_model(name, state["num_classes"], exits, **cfg)
    model.load_state_dict(state["state"])
    return model.eval()


def ablation_configs(base: TrainConfig) -> dict[str, TrainConfig]:
    """The DistrEE ablation: full loss, no distillation, no feature transfer, CE only."""
    loss = base.loss
    return {
        "joint (CE+KD+FT)": base,
        "no distillation": replace(base, loss=replace(loss, distill=False)),
        "no feature transfer": replace(base, loss=replace(loss, feature=False)),
        "CE only": replace(base, loss=LossConfig(distill=False, feature=False,
                                                 exit_weights=loss.exit_weights)),
    }
