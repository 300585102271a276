"""``offramp import MODEL.onnx``: an ONNX image classifier offramp never saw becomes a served
multi-exit bundle (:mod:`offramp.ml.onnx_import`); ``--list`` shows where it can be cut."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from offramp.cli.args import positive
from offramp.errors import OfframpError
from offramp.ml.commands import COMMANDS
from offramp.ml.onnx_import import IMAGENET_MEAN, IMAGENET_STD, ImportOptions, import_onnx

DESCRIPTION = """Split an ONNX image classifier (one input N x 3 x H x W, one output N x classes,
opset 13 or later) at tensors that carry everything forward, train an exit head at each cut on
a dataset (its features computed with ONNX Runtime; distilled from the model's own output),
and write a calibrated bundle every offramp command serves. The last exit is the model itself,
unchanged. No torch model of the backbone is needed. --list shows the cut points first."""


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def register(sub: Any) -> None:
    p = sub.add_parser("import", help=COMMANDS["import"], description=DESCRIPTION)
    p.add_argument("model", type=Path, help="the ONNX file")
    p.add_argument("--list", action="store_true",
                   help="list the cut points (tensor, shape, FLOPs up to it, bytes a sample) "
                        "and stop")
    p.add_argument("--dataset", default=None, help="the dataset the model was trained on, to "
                   "train the exits on (offramp datasets lists them)")
    p.add_argument("--data-dir", default=None, help="that dataset's folder, where it needs one")
    p.add_argument("--at", type=floats, default=(0.25, 0.5),
                   help="cut near these fractions of the model's FLOPs, one early exit each "
                        "(of the points within 0.05 of one, the one that sends the fewest "
                        "bytes)")
    p.add_argument("--cut-at", type=names, default=(), metavar="TENSOR,...",
                   help="cut at these tensors instead (names from --list)")
    p.add_argument("--mean", type=floats, default=IMAGENET_MEAN,
                   help="per-channel mean the model's input was normalised with (pixels in "
                        "0..1)")
    p.add_argument("--std", type=floats, default=IMAGENET_STD,
                   help="per-channel standard deviation of that normalisation")
    p.add_argument("--out", type=Path, default=None,
                   help="bundle directory (None: bundles/<file stem>)")
    p.add_argument("--name", default="", help="the model's name in the bundle (empty: the "
                   "file's stem)")
    p.add_argument("--train-limit", type=positive, default=None,
                   help="train the exit heads on this many training images, a seeded choice "
                        "(default: all of them; the images are held at the size the dataset "
                        "comes at and resized a batch at a time)")
    p.add_argument("--epochs", type=positive, default=40, help="exit head training epochs")
    p.add_argument("--distill", type=float, default=0.5,
                   help="weight of distillation from the model's output in the heads' loss "
                        "(0: labels only)")
    p.set_defaults(handler=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from offramp.ml.onnx_graph import cuts, read_graph

    console = Console()
    if args.list:
        graph = read_graph(args.model)
        found, total = cuts(graph)
        table = Table(title=f"cut points of {args.model} ({total / 1e6:.1f} MFLOPs, "
                            f"{graph.classes} classes, input {graph.input_shape})")
        table.add_column("tensor", overflow="fold")
        for col in ("shape", "MFLOPs to here", "share", "KiB a sample"):
            table.add_column(col, justify="right", no_wrap=True)
        for c in found:
            table.add_row(c.tensor, "x".join(map(str, c.shape)), f"{c.flops / 1e6:.1f}",
                          f"{c.flops / total:.2f}", f"{c.bytes / 1024:.1f}")
        console.print(table)
        return 0
    if not args.dataset:
        raise OfframpError("--dataset: the dataset to train the exits on (or --list)")
    if len(args.mean) != 3 or len(args.std) != 3 or min(args.std) <= 0:
        raise OfframpError("--mean and --std: three numbers each, the deviations above 0")
    if not 0 <= args.distill <= 1:
        raise OfframpError(f"--distill {args.distill}: a weight between 0 and 1")
    out = args.out or Path("bundles") / args.model.stem
    options = ImportOptions(args.model, args.dataset, out, data_dir=args.data_dir, at=args.at,
                            cut_at=args.cut_at, mean=args.mean, std=args.std, name=args.name,
                            train_limit=args.train_limit, epochs=args.epochs,
                            distill=args.distill)
    done = import_onnx(options)
    from offramp.cli.tables import accuracy_table, segments_table, thresholds_table

    console.print(f"[bold]{done.bundle.name}[/] imported from {args.model} -> {out}")
    console.print(accuracy_table("per-exit accuracy", {"val": done.val_accuracy,
                                                   "test": done.test_accuracy}))
    console.print(segments_table(done.bundle))
    calib = done.bundle.calibration()
    target = calib.exit_accuracy()[-1] - 0.01
    thr = calib.thresholds_for_accuracy("confidence", target)
    console.print(thresholds_table(calib, "confidence", thr,
                                   f"thresholds for target accuracy {target:.4f}"))
    return 0
