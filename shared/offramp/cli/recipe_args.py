"""The command-line form of a :class:`~offramp.ml.build.Recipe`: a preset, then any option that
changes it (``offramp build`` and ``offramp train``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from offramp.cli.args import positive
from offramp.ml.build import PRESETS, Recipe
from offramp.ml.data import DATASETS
from offramp.ml.zoo import REGISTRY
from offramp.model.bundle import BundleError

DEFAULT_PRESET = "demo"


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def model_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it is JSON (numbers, true, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{n}: {r.model} on {r.dataset} at {r.input_size} px"
                        for n, r in PRESETS.items())
    g = p.add_argument_group("recipe", "a preset, changed by any of the options after it")
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"the starting recipe ({presets})")
    g.add_argument("--name", default=None, help="the model's name, recorded in model.pt "
                   "and given to the bundle made of it (None: the preset's, or "
                   "<dataset>-<model>-<size> when model, dataset or size change)")
    g.add_argument("--model", default=None, choices=sorted(REGISTRY),
                   help="zoo model (offramp models describes each; None: the preset's)")
    g.add_argument("--model-opt", action="append", type=model_option, default=None,
                   metavar="KEY=VALUE", help="a model setting such as width=0.5, repeatable "
                   "(offramp models lists them; None: the preset's for its own model)")
    g.add_argument("--dataset", default=None, choices=list(DATASETS),
                   help="training data (offramp datasets; None: the preset's)")
    g.add_argument("--data-dir", default=None, help="the dataset's folder (None: where the "
                   "dataset is looked for by default)")
    g.add_argument("--input-size", type=positive, default=None, help="square input size in "
                   "pixels; images are resized to it (None: the preset's)")
    g.add_argument("--exits", type=ints, default=None, help="block indices that carry an exit, "
                   "e.g. 5,8,11 (offramp models lists candidates; None: the model's default)")
    g.add_argument("--cuts", type=ints, default=None, help="exit numbers that end segments, "
                   "e.g. 2,4 (None: every exit)")
    g.add_argument("--weights", default=None, help="initial weights: a state-dict file, or "
                   "imagenet for a model that ships them (None: the preset's, else random)")
    g.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="train only the exit heads, on backbone features computed once "
                   "(None: the preset's)")
    g.add_argument("--finetune-epochs", type=int, default=None, help="after the heads, train "
                   "everything for this many epochs at a tenth of the rate (None: the preset's)")
    g.add_argument("--train-limit", type=positive, default=None, help="train on this many "
                   "training images, a seeded choice (None: all)")
    g.add_argument("--epochs", type=positive, default=None, help="training epochs (None: the "
                   "preset's)")
    g.add_argument("--batch-size", type=positive, default=None, help="training batch size "
                   "(None: the preset's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, one-cycle "
                   "schedule (None: the preset's)")
    g.add_argument("--seed", type=int, default=None, help="seed of initialisation, splits and "
                   "batches (None: the preset's)")
    t = p.add_argument_group("training terms", "DistrEE's joint loss of every exit")
    t.add_argument("--alpha", type=float, default=None, help="weight of cross-entropy against "
                   "distillation in each exit's loss (None: 0.5)")
    t.add_argument("--temperature", type=float, default=None, help="distillation temperature "
                   "(None: 3)")
    t.add_argument("--gamma", type=float, default=None, help="weight of the feature-transfer "
                   "term (None: 0.1)")
    t.add_argument("--teacher", default=None, metavar="MODEL_PT", help="distil from this "
                   "trained model (the model.pt of offramp build or train, same dataset and "
                   "input size) instead of the final exit, which then distils too (None: "
                   "self-distillation from the final exit)")
    t.add_argument("--no-distill", action="store_true", help="train without distillation")
    t.add_argument("--no-feature", action="store_true", help="train without feature transfer")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The preset with the options given; a value out of range is one BundleError."""
    try:
        return _recipe(args)
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def _recipe(args: argparse.Namespace) -> Recipe:
    base = PRESETS[args.preset]
    model = args.model or base.model
    cfg = dict(base.model_cfg) if model == base.model else {}
    cfg |= dict(args.model_opt or [])
    if "input_size" in cfg:
        raise BundleError("the input size is --input-size, not a model option")
    pick = {k: v for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir),
                              ("input_size", args.input_size), ("exits", args.exits),
                              ("cuts", args.cuts), ("weights", args.weights),
                              ("train_limit", args.train_limit), ("teacher", args.teacher))
            if v is not None}
    train = base.train
    train = replace(train, **{k: v for k, v in (
        ("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
        ("seed", args.seed), ("freeze_backbone", args.freeze_backbone),
        ("finetune_epochs", args.finetune_epochs)) if v is not None})
    loss = replace(train.loss, **{k: v for k, v in (
        ("alpha", args.alpha), ("temperature", args.temperature), ("gamma", args.gamma))
        if v is not None})
    if args.no_distill or args.no_feature:
        loss = replace(loss, distill=loss.distill and not args.no_distill,
                       feature=loss.feature and not args.no_feature)
    recipe = replace(base, model=model, model_cfg=cfg, train=replace(train, loss=loss), **pick)
    changed = (recipe.model, recipe.dataset, recipe.input_size) != (
        base.model, base.dataset, base.input_size)
    name = args.name or (f"{recipe.dataset}-{recipe.model}-{recipe.input_size}" if changed
                         else base.name)
    return replace(recipe, name=name)


def default_out(args: argparse.Namespace, recipe: Recipe) -> Path:
    return Path("bundles") / (recipe.name if args.name or recipe.name != PRESETS[args.preset].name
                              else args.preset)
