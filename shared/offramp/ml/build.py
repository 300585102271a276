"""Recipes, presets (named recipes) and the ``offramp build`` pipeline: check -> train ->
export -> calibrate, cached by the recipe's digest."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from offramp.ml.calibrate import calibrate_bundle
from offramp.ml.compress import record_wire_codecs
from offramp.ml.data import DATASETS, Dataset, DatasetError, load_dataset
from offramp.ml.export import export_bundle
from offramp.ml.loss import LossConfig
from offramp.ml.train import Saved, TrainConfig, TrainResult, train
from offramp.ml.transfer import load_weights
from offramp.ml.zoo import REGISTRY, ZOO_VERSION, MultiExitNet, create_model
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
    exits: tuple[int, ...] | None = None  # block indices; None: the model's default exits
    weights: str | None = None  # a state-dict file, or "imagenet" (transfer.load_weights)
    train_limit: int | None = None  # train on this many training images (seeded choice)
    teacher: str | None = None  # a trained model.pt to distil from; None: the final exit

    def digest(self) -> str:
        doc: dict[str, Any] = {
            "name": self.name, "model": self.model, "cfg": self.model_cfg,
            "dataset": self.dataset, "data_dir": self.data_dir, "size": self.input_size,
            "train": self.train.to_dict(), "cuts": list(self.cuts), "zoo": ZOO_VERSION}
        # set only when given, so that recipes written before these fields keep their digest
        doc |= {k: v for k, v in (("exits", self.exits), ("weights", self.weights),
                                  ("train_limit", self.train_limit), ("teacher", self.teacher))
                if v is not None}
        if (stamp := _stamp(self.teacher)) is not None:  # a teacher trained again in place
            doc["teacher_file"] = stamp
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def backbone_digest(self) -> str:
        """What a frozen backbone's features depend on (not the heads' training terms)."""
        doc: dict[str, Any] = {"model": self.model, "cfg": self.model_cfg, "exits": self.exits,
               "weights": self.weights, "dataset": self.dataset, "data_dir": self.data_dir,
               "size": self.input_size, "limit": self.train_limit, "seed": self.train.seed,
               "zoo": ZOO_VERSION}
        if (stamp := _stamp(self.weights)) is not None:  # a file rewritten in place
            doc["weights_file"] = stamp
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: str | None) -> list[int] | None:
    """Size and modification time of a file a recipe names (None: not a file)."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns]


PRESETS: dict[str, Recipe] = {
    # Quick: about 1.5 minutes on 2 CPU cores; what `make demo` serves.
    "demo": Recipe("digits-mnv2-demo", "mobilenetv2", {"width": 0.5, "stem_stride": 2},
                   train=TrainConfig(epochs=15)),
    # The benchmark model: MobileNetV2 width 1.0, CIFAR layout, 32x32 digits.
    "mnv2-digits": Recipe("digits-mnv2", "mobilenetv2", {"width": 1.0},
                          train=TrainConfig(epochs=15)),
    # MobileNetV2 width 1.0 from scratch on Fashion-MNIST at 32x32 (CIFAR layout).
    "mnv2-fashion": Recipe("fashion-mnv2", "mobilenetv2", {"width": 1.0},
                           dataset="fashion-mnist", train=TrainConfig(epochs=15, batch_size=128)),
    # EfficientNet-Lite0 with its ImageNet weights, exits trained on the frozen backbone; 96 px
    # keeps the one pass of the backbone over 55,000 images within minutes on a small CPU.
    "effnet-fashion": Recipe("fashion-effnet-lite0", "efficientnet_lite0", {},
                             dataset="fashion-mnist", input_size=96, weights="imagenet",
                             train=TrainConfig(epochs=10, batch_size=256, lr=3e-3, augment=False,
                                               freeze_backbone=True)),
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
    """The recipe's model, initialised from its seed (so a recipe always trains the same), with
    the recipe's weights loaded."""
    torch.manual_seed(recipe.train.seed)
    model = create_model(recipe.model, num_classes, recipe.exits, input_size=recipe.input_size,
                         **recipe.model_cfg)
    if recipe.weights:
        load_weights(model, recipe.weights)
    return model


def check(recipe: Recipe) -> MultiExitNet:
    """Every error a recipe can have that is not about its data, before any data is read or
    any training starts: one :class:`BundleError` naming it. Returns the model (10 classes)."""
    if recipe.model not in REGISTRY:
        raise BundleError(f"unknown model {recipe.model!r}; one of {', '.join(sorted(REGISTRY))}"
                          " (offramp models)")
    if recipe.dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {recipe.dataset!r}; one of {', '.join(DATASETS)} "
                           "(offramp datasets)")
    if recipe.train_limit is not None and recipe.train_limit < 1:
        raise BundleError(f"--train-limit must be >= 1, got {recipe.train_limit}")
    try:
        model = make_model(recipe, 10)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{recipe.model}: {exc}") from None
    deepest = max(info.reduction for info in model.feature_info)
    if recipe.input_size < deepest:
        raise BundleError(f"input size {recipe.input_size} is too small for {recipe.model}: its "
                          f"strides reduce by {deepest}; use --input-size {deepest} or more")
    bad = [c for c in recipe.cuts if not 1 <= c <= model.num_exits]
    if bad:
        raise BundleError(f"cuts {bad} are not exits of this model (exit numbers 1.."
                          f"{model.num_exits}; --exits chooses where the exits are)")
    load_teacher(recipe)
    return model


def load_teacher(recipe: Recipe, num_classes: int | None = None) -> MultiExitNet | None:
    """The separately trained model the exits learn from (None: the final exit teaches the
    others), checked against the recipe: same input size, same classes when known."""
    if recipe.teacher is None:
        return None
    if recipe.train.freeze_backbone:
        raise BundleError("--teacher trains with the whole network; heads on a frozen backbone "
                          "learn from its own final exit (drop --teacher or --freeze-backbone)")
    teacher = load_trained(Path(recipe.teacher))
    size = teacher.config.get("input_size")
    if size is not None and size != recipe.input_size:
        raise BundleError(f"teacher {recipe.teacher} was trained at {size} px and this recipe's "
                          f"input is {recipe.input_size} px (--input-size {size}, or another "
                          "teacher)")
    if num_classes is not None and teacher.num_classes != num_classes:
        raise BundleError(f"teacher {recipe.teacher} has {teacher.num_classes} classes and "
                          f"{recipe.dataset} has {num_classes}")
    return teacher


def load_data(recipe: Recipe) -> Dataset:
    return load_dataset(recipe.dataset, recipe.data_dir, recipe.input_size, recipe.train.seed,
                        train_limit=recipe.train_limit)


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
    check(recipe)
    data = load_data(recipe)
    spec = InputSpec(height=recipe.input_size, width=recipe.input_size)
    model = make_model(recipe, len(data.classes))
    teacher = load_teacher(recipe, len(data.classes))
    t0 = time.monotonic()
    saved = Saved(out / ".train" / f"{recipe.digest()}.pt",
                  features=out.parent / ".features" / f"{recipe.backbone_digest()}.pt")
    result: TrainResult = train(model, data, spec, recipe.train, saved=saved,
                                progress=progress, teacher=teacher)
    seconds = round(time.monotonic() - t0, 1)
    metrics = {"recipe": recipe.digest(), "preset_name": recipe.name, "dataset": recipe.dataset,
               "data_dir": recipe.data_dir,
               "train_seconds": seconds, "resumed_at_epoch": result.resumed_at_epoch,
               "val_exit_accuracy": result.val_accuracy,
               "test_exit_accuracy": result.test_accuracy, "history": result.history[-1:]}
    say = print if progress else (lambda *a, **k: None)
    say(f"exporting the segments to ONNX in {out}", flush=True)
    bundle = export_bundle(model, out, name=recipe.name, classes=data.classes, spec=spec,
                           cuts=recipe.cuts or None, metrics=metrics)
    save_trained(out / "model.pt", model, recipe, data.classes)
    say(f"calibrating the exits on {len(data.val.labels)} validation images", flush=True)
    calibrate_bundle(bundle, data.val)
    say("measuring the wire codecs at every cut (validation split)", flush=True)
    record_wire_codecs(model, bundle, data)
    return load_bundle(out), {"cached": False, **metrics}


def save_trained(path: Path, model: MultiExitNet, recipe: Recipe, classes: list[str]) -> None:
    """``model.pt``: the weights with what a later ``offramp export`` needs to label and feed
    them (the dataset, its class names and the input size), so a re-exported bundle answers
    with the classes it was trained on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": model.config, "num_classes": model.num_classes,
                "classes": list(classes), "input_size": recipe.input_size,
                "dataset": recipe.dataset, "data_dir": recipe.data_dir,
                "state": model.state_dict()}, path)


def load_trained(path: Path) -> MultiExitNet:
    """Rebuild a model saved by ``build`` or ``offramp train`` (``model.pt``)."""
    if not path.is_file():
        raise BundleError(f"trained model {path} is missing (run offramp train or build first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        cfg = dict(state["model_config"])
        name, exits = cfg.pop("name"), cfg.pop("exits")
        cfg.pop("stage_ends", None)
        cfg.setdefault("head_grid", 1)  # saved before exit heads pooled to a grid
        model = create_model(name, state["num_classes"], exits, **cfg)
        model.load_state_dict(state["state"])
    except Exception as exc:  # pickle, zip, key and shape errors alike: not what build saves
        raise BundleError(f"{path} is not a model saved by offramp build or train "
                          f"({type(exc).__name__}: {exc})") from None
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
