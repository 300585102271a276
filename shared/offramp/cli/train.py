"""``offramp build | train | export | calibrate | compress | models | datasets`` (the ``train``
extra)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from offramp.cli.args import positive
from offramp.cli.recipe_args import add_recipe_options, default_out, ints, recipe_from_args
from offramp.cli.tables import accuracy_table, segments_table, thresholds_table
from offramp.ml.commands import COMMANDS
from offramp.ml.zoo import REGISTRY
from offramp.model.bundle import Bundle, BundleError, load_bundle
from offramp.policy.scores import CRITERIA


def register(sub: Any) -> None:
    p = sub.add_parser("build", help=COMMANDS["build"])
    add_recipe_options(p)
    p.add_argument("--out", type=Path, default=None, help="bundle directory (None: "
                   "bundles/<preset>, or bundles/<name> for a changed recipe)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching bundle exists")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("train", help=COMMANDS["train"])
    add_recipe_options(p)
    p.add_argument("--out", type=Path, required=True, help="run directory (model.pt)")
    p.add_argument("--ablation", action="store_true",
                   help="also train without distillation / feature transfer and compare")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("models", help=COMMANDS["models"])
    p.add_argument("model", nargs="?", default=None, choices=sorted(REGISTRY),
                   help="one model only (None: all)")
    p.add_argument("--input-size", type=positive, default=None, help="input size to measure at "
                   "(None: each model's default)")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("datasets", help=COMMANDS["datasets"])
    p.set_defaults(handler=cmd_datasets)

    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("trained", type=Path, help="a trained model.pt (offramp train)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--cuts", type=ints, default=None, help="exits that end segments, e.g. 2,4 "
                   "(None: every exit)")
    p.add_argument("--dataset", default=None, help="the dataset the model was trained on, for "
                   "a model.pt that does not say (None: as saved; a different one is refused)")
    p.add_argument("--data-dir", default=None, help="that dataset's folder, where it needs one "
                   "(None: as saved)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("calibrate", help=COMMANDS["calibrate"])
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--target-accuracy", type=float, default=None, help="lowest thresholds that "
                   "keep this accuracy (None: final-exit accuracy - 1 point)")
    p.add_argument("--flops-budget", type=float, default=None,
                   help="best accuracy with mean FLOPs <= this fraction of the full model")
    p.add_argument("--criterion", choices=CRITERIA, default="confidence",
                   help="the exit score compared with the thresholds")
    p.add_argument("--recalibrate", action="store_true", help="recompute on the validation split")
    p.add_argument("--int8", action="store_true", help="also write TensorRT INT8 calibration "
                   "tables (one per segment) from the validation split into the bundle, for "
                   "workers with OFFRAMP_WORKER_TRT_PRECISION=int8")
    p.add_argument("--int8-samples", type=positive, default=512,
                   help="validation images the INT8 tables are measured on")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("compress", help=COMMANDS["compress"])
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--cuts", type=ints, default=None, help="segment boundaries to compress, "
                   "comma-separated (default: every cut of the bundle)")
    p.add_argument("--ratios", type=ints, default=(2, 4, 8), help="channel reductions to train")
    p.add_argument("--epochs", type=positive, default=8, help="autoencoder training epochs")
    p.add_argument("--train-limit", type=positive, default=None, help="train the autoencoders "
                   "on this many training images, a seeded choice (None: all)")
    p.add_argument("--val-limit", type=positive, default=None, help="compare the codecs on "
                   "the first this many validation images (None: all)")
    p.set_defaults(handler=cmd_compress)


def cmd_build(args: argparse.Namespace) -> int:
    from offramp.ml.build import build

    console = Console()
    recipe = recipe_from_args(args)
    out = args.out or default_out(args, recipe)
    bundle, metrics = build(recipe, out, force=args.force)
    state = "cached" if metrics["cached"] else f"trained in {metrics['train_seconds']} s"
    console.print(f"[bold]{recipe.name}[/] -> {out}: {state}")
    console.print(accuracy_table("per-exit accuracy", {"val": metrics["val_exit_accuracy"],
                                                   "test": metrics["test_exit_accuracy"]}))
    console.print(segments_table(bundle))
    calib = bundle.calibration()
    target = calib.exit_accuracy()[-1] - 0.01
    thr = calib.thresholds_for_accuracy("confidence", target)
    console.print(thresholds_table(calib, "confidence", thr,
                                   f"thresholds for target accuracy {target:.4f}"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from offramp.ml import build as steps
    from offramp.ml.train import Saved, train
    from offramp.model.inputs import InputSpec

    console = Console()
    recipe = recipe_from_args(args)
    steps.check(recipe)
    data = steps.load_data(recipe)
    spec = InputSpec(height=recipe.input_size, width=recipe.input_size)
    teacher = steps.load_teacher(recipe, len(data.classes))
    runs = steps.ablation_configs(recipe.train) if args.ablation else {"joint": recipe.train}
    rows: dict[str, list[float]] = {}
    for name, run_cfg in runs.items():
        model = steps.make_model(recipe, len(data.classes))
        console.print(f"[bold]{name}[/]")
        result = train(model, data, spec, run_cfg, saved=Saved(args.out / f"{name}.ckpt"),
                       teacher=teacher)
        rows[name] = result.test_accuracy
        if name == next(iter(runs)):
            steps.save_trained(args.out / "model.pt", model, recipe, data.classes)
    console.print(accuracy_table("test accuracy per exit", rows))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from offramp.ml.catalog import describe_model, models

    console = Console()
    for name in [args.model] if args.model else models():
        info = describe_model(name, args.input_size)
        opts = ", ".join(f"{k}={v}" for k, v in info.options.items())
        table = Table(title=f"{name} at {info.input_size}x{info.input_size} "
                            f"({info.total_flops / 1e6:.1f} MFLOPs; options: {opts})")
        for col in ("block", "after", "default exit", "MFLOPs to here", "share",
                    "activation KiB"):
            table.add_column(col, justify="right")
        for pt in info.points:
            table.add_row(str(pt.block), pt.name, "yes" if pt.default else "",
                          f"{pt.flops / 1e6:.1f}", f"{pt.flops / info.total_flops:.2f}",
                          f"{pt.activation_bytes / 1024:.1f}")
        console.print(table)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from offramp.ml.catalog import datasets

    for row in datasets():
        print(f"{row.name}\n  {row.description}\n  folder: {row.folder}\n  present: {row.present}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from offramp.ml.build import load_trained
    from offramp.ml.export import export_bundle
    from offramp.model.inputs import InputSpec

    model = load_trained(args.trained)
    state = torch.load(args.trained, map_location="cpu", weights_only=False)
    trained_at = model.config.get("input_size")
    size = int(state.get("input_size") or (trained_at if isinstance(trained_at, int) else 32))
    dataset, classes = _trained_on(args, state, size)
    if len(classes) != model.num_classes:
        raise BundleError(f"{args.trained} has {model.num_classes} classes and {dataset} has "
                          f"{len(classes)}: pass the --dataset it was trained on")
    state = {**state, "dataset": dataset, "classes": classes, "input_size": size}
    bundle = export_bundle(model, args.out, name=args.out.name, classes=classes,
                           spec=InputSpec(height=size, width=size), cuts=args.cuts,
                           metrics={"dataset": dataset, "data_dir": state.get("data_dir")})
    torch.save(state, args.out / "model.pt")
    Console().print(segments_table(bundle))
    return 0


def _trained_on(args: argparse.Namespace, state: dict[str, Any], size: int
                ) -> tuple[str, list[str]]:
    """The dataset and class names of a saved model: as saved (or in the manifest of the
    bundle it sits in), or ``--dataset`` for a model saved without them. Never a guess: a
    wrong one labels every answer wrongly."""
    saved = state.get("dataset")
    beside = args.trained.parent / "manifest.json"
    if not saved and beside.is_file():
        manifest = load_bundle(args.trained.parent).manifest
        saved = manifest.metrics.get("dataset")
        state = {**state, "classes": state.get("classes") or manifest.classes}
    if args.dataset and saved and args.dataset != saved:
        raise BundleError(f"{args.trained} was trained on {saved}, not {args.dataset}")
    dataset = args.dataset or saved
    if not dataset:
        raise BundleError(f"{args.trained} does not say which dataset it was trained on (saved "
                          "by an older offramp): pass --dataset NAME (offramp datasets)")
    if state.get("classes"):
        return str(dataset), [str(c) for c in state["classes"]]
    from offramp.ml.data import load_dataset

    data_dir = args.data_dir or state.get("data_dir")
    return str(dataset), load_dataset(str(dataset), data_dir, size, splits=("test",)).classes


def cmd_calibrate(args: argparse.Namespace) -> int:
    from offramp.ml.calibrate import calibrate_bundle

    bundle = load_bundle(args.bundle)
    data = None
    if args.recalibrate or not bundle.manifest.calibration:
        data = _bundle_data(bundle)
        calibrate_bundle(bundle, data.val)
    calib = bundle.calibration()
    console = Console()
    if args.int8:
        from offramp.ml.int8 import write_int8_tables

        split = (data or _bundle_data(bundle)).val
        for path in write_int8_tables(bundle, split, samples=args.int8_samples):
            console.print(f"INT8 calibration table: {path}")
    console.print(f"ECE per exit (confidence): {calib.ece()}")
    if args.flops_budget is not None:
        thr = calib.thresholds_for_budget(args.criterion, args.flops_budget)
        title = f"best accuracy within {args.flops_budget:.2f} of the full model's FLOPs"
    else:
        target = (args.target_accuracy if args.target_accuracy is not None
                  else calib.exit_accuracy()[-1] - 0.01)
        thr = calib.thresholds_for_accuracy(args.criterion, target)
        title = f"thresholds for target accuracy {target:.4f}"
    console.print(thresholds_table(calib, args.criterion, thr, title))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from offramp.ml.build import load_trained
    from offramp.ml.compress import (
        compare_codecs,
        export_autoencoder,
        record_codecs,
        train_autoencoder,
    )
    bundle = load_bundle(args.bundle)
    cuts = args.cuts or tuple(range(1, bundle.num_segments))
    bad = [c for c in cuts if not 1 <= c < bundle.num_segments]
    if bad or not cuts:
        raise BundleError(f"--cuts {list(bad or cuts)}: {bundle.name} has "
                          f"{bundle.num_segments} segments, so its cuts are 1.."
                          f"{bundle.num_segments - 1}")
    if not args.ratios or min(args.ratios) < 2:
        raise BundleError(f"--ratios must be integers >= 2, got {list(args.ratios)}")
    model = load_trained(bundle.path("model.pt"))
    data = _bundle_data(bundle, args.train_limit)
    console = Console()
    for cut in cuts:
        aes = {}
        for ratio in args.ratios:
            console.print(f"cut {cut}: training the ratio-{ratio} autoencoder")
            enc, dec = train_autoencoder(model, bundle, data, cut, ratio, epochs=args.epochs)
            export_autoencoder(bundle, cut, ratio, enc, dec)
            aes[ratio] = (enc, dec)
        table = Table(title=f"codecs at cut {cut} (after segment {cut})")
        for col in ("codec", "bytes/sample", "final-exit accuracy (validation)"):
            table.add_column(col, justify="right")
        reports = compare_codecs(model, bundle, data, cut, aes, args.val_limit)
        record_codecs(bundle, cut, reports)
        for r in reports:
            table.add_row(r.codec, str(r.bytes_per_sample), f"{r.final_accuracy:.4f}")
        console.print(table)
    return 0


def _bundle_data(bundle: Bundle, train_limit: int | None = None) -> Any:
    """The dataset a bundle was trained on, at its input size (from its manifest's metrics)."""
    from offramp.ml.data import load_dataset

    metrics = bundle.manifest.metrics
    return load_dataset(str(metrics.get("dataset", "digits")), metrics.get("data_dir"),
                        bundle.manifest.input.height, train_limit=train_limit)
