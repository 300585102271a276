"""``offramp import MODEL.onnx``: any ONNX image classifier becomes a served multi-exit bundle,
without a torch model of its backbone.

1. The graph's cut points (:mod:`offramp.ml.onnx_graph`); those nearest the asked FLOPs
   fractions (``at``), or the tensors named, become the cuts.
2. The pieces between cuts (of the graph with its shape arithmetic folded) are extracted with
   onnx's own tools and run over the dataset with ONNX Runtime, a batch at a time: at each cut,
   the activation's averages over a 2 x 2 grid (4 C floats a sample; a global average where
   the map's side is odd) are kept, and the model's own output, the teacher. Memory holds
   those, not the activations, and the images at the size the dataset comes at (Fashion-MNIST's
   55,000 training images: 129 MB at 28 px where 224 px would take 8.3 GB), each batch resized
   to the model's input as it goes in.
3. A head per cut (that pooling, then a hidden layer, ReLU, the classes) is trained in torch on
   the kept features, with cross-entropy and distillation from the model's output (DistrEE's
   taught exits), then written into the piece as ONNX nodes.
4. The bundle is written (segments, the model whole as ``full.onnx``), checked (the chained
   segments' final logits against the original model's, on test images) and calibrated on
   the validation split, as ``offramp build`` does.

The final exit is the original model, unchanged: its answers are the model's own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offramp.errors import OfframpError
from offramp.ml.calibrate import calibrate_bundle
from offramp.ml.data import DATASETS, Dataset, Split, load_dataset
from offramp.ml.export import ROWS_MODEL, write_rows_model
from offramp.ml.onnx_graph import (
    Cut,
    Graph,
    GraphError,
    HeadWeights,
    cuts,
    extract,
    graft_exit,
    grid_kernel,
    plain_copy,
    pool,
    read_graph,
)
from offramp.ml.progress import progress
from offramp.model.bundle import Bundle, Manifest, SegmentSpec, TensorSpec, load_bundle
from offramp.model.images import resize_uint8
from offramp.model.inputs import InputSpec, normalise
from offramp.model.sessions import make_session

ATOL = 1e-4  # the chained segments against the original model
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImportOptions:
    model: Path
    dataset: str
    out: Path
    data_dir: str | None = None
    at: tuple[float, ...] = (0.25, 0.5)  # FLOPs fractions to cut nearest to
    cut_at: tuple[str, ...] = ()  # tensor names to cut at (instead of ``at``)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = ""  # the bundle's model name ('': the file's stem)
    train_limit: int | None = None  # None: every training image
    epochs: int = 40
    hidden: int = 128
    batch: int = 64
    distill: float = 0.5  # weight of distillation from the model's output (0: labels only)
    temperature: float = 2.0
    seed: int = 0


@dataclass
class Imported:
    bundle: Bundle
    cuts: list[Cut]
    total_flops: int
    val_accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def choose_cuts(found: Sequence[Cut], total: int, at: Sequence[float],
                names: Sequence[str]) -> list[Cut]:
    """The cuts named, or those nearest the FLOPs fractions ``at``, in graph order."""
    if not found:
        raise GraphError("the graph has no cut point: no 4-D activation carries everything "
                         "forward (offramp splits convolutional classifiers)")
    if names:
        by_name = {c.tensor: c for c in found}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise GraphError(f"not cut points: {', '.join(unknown)} (offramp import MODEL "
                             "--list shows them)")
        chosen = {by_name[n] for n in names}
    else:
        if not at or any(not 0 < f < 1 for f in at):
            raise GraphError(f"--at {list(at)}: FLOPs fractions between 0 and 1")
        chosen = {nearest(found, total, f) for f in at}
    return sorted(chosen, key=lambda c: c.position)


NEAR = 0.05  # cuts this close to an asked FLOPs share compete on the bytes they send


def nearest(found: Sequence[Cut], total: int, fraction: float) -> Cut:
    """Of the cuts within :data:`NEAR` of ``fraction`` of the FLOPs, the one whose activation
    is smallest (a block's output, not the wide tensor inside it); else the nearest."""
    near = [c for c in found if abs(c.flops / total - fraction) <= NEAR]
    if near:
        return min(near, key=lambda c: (c.bytes, abs(c.flops / total - fraction)))
    return min(found, key=lambda c: abs(c.flops / total - fraction))


def import_onnx(o: ImportOptions, *, show: bool = True) -> Imported:
    graph = read_graph(o.model)
    found, total = cuts(graph)
    chosen = choose_cuts(found, total, o.at, o.cut_at)
    c, h, w = graph.input_shape
    if c != 3 or h != w:
        raise GraphError(f"{o.model}: input (C, H, W) = {graph.input_shape}; offramp's "
                         "datasets are square RGB images (C = 3, H = W)")
    native = DATASETS[o.dataset].native_size if o.dataset in DATASETS else 0
    data = load_dataset(o.dataset, o.data_dir, size=min(h, native or h), seed=o.seed,
                        train_limit=o.train_limit)
    if graph.classes != len(data.classes):
        raise GraphError(f"{o.model} has {graph.classes} outputs and {o.dataset} "
                         f"{len(data.classes)} classes: import it with the dataset it was "
                         "trained on")
    spec = InputSpec(c, h, w, tuple(o.mean), tuple(o.std))
    o.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="offramp-import-") as tmp:
        pieces = _pieces(graph, chosen, Path(tmp))
        with progress(show) as bar:
            kernels = [grid_kernel(c.shape) for c in chosen]
            feats = {s: _features(pieces, kernels, getattr(data, s), spec, o.batch, bar, s)
                     for s in ("train", "val", "test")}
            heads, val_acc, test_acc = _train_heads(feats, kernels, data, o, bar)
        _write_segments(o, graph, chosen, pieces, heads)
    plain_copy(graph, o.out / "full.onnx")
    write_rows_model(o.out / ROWS_MODEL)
    bundle = _write_manifest(o, graph, chosen, total, spec, data, val_acc, test_acc)
    _verify(bundle, o.model, normalise(resize_uint8(data.test.images[:16], h, h), spec))
    calibrate_bundle(bundle, Split(resize_uint8(data.val.images, h, h), data.val.labels))
    return Imported(load_bundle(o.out), chosen, total, val_acc, test_acc)


def _pieces(graph: Graph, chosen: list[Cut], tmp: Path) -> list[Path]:
    """The graph between consecutive cuts, as ONNX files: the trunk of each segment."""
    bounds = [graph.input, *(c.tensor for c in chosen), graph.output]
    paths = []
    for k, (start, end) in enumerate(itertools.pairwise(bounds), start=1):
        path = tmp / f"piece-{k}.onnx"
        extract(graph, start, end, path)
        paths.append(path)
    return paths


@dataclass
class Features:
    pooled: list[np.ndarray]  # per cut: (N, 4 C) or (N, C) averages of the activation
    logits: np.ndarray  # (N, classes): the model's own output


def _features(pieces: list[Path], kernels: list[int], split: Split, spec: InputSpec,
              batch: int, bar: Any, name: str) -> Features:
    sessions = [make_session(p, threads=0) for p in pieces]
    pooled: list[list[np.ndarray]] = [[] for _ in pieces[:-1]]
    logits: list[np.ndarray] = []
    task = bar.add_task(f"{name} split through the model", total=len(split.images))
    for start in range(0, len(split.images), batch):
        x = normalise(resize_uint8(split.images[start:start + batch], spec.height, spec.width),
                      spec)
        for k, session in enumerate(sessions):
            x = session.run(None, {"x": x})[0]
            if k < len(pooled):
                pooled[k].append(pool(x, kernels[k]))
        logits.append(x)
        bar.update(task, advance=len(x))
    return Features([np.concatenate(p) for p in pooled], np.concatenate(logits))


def _train_heads(feats: dict[str, Features], kernels: list[int], data: Dataset,
                 o: ImportOptions, bar: Any
                 ) -> tuple[list[HeadWeights], list[float], list[float]]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from offramp.ml.train import cpu_threads

    torch.manual_seed(o.seed)
    torch.set_num_threads(cpu_threads())
    classes = feats["train"].logits.shape[1]
    teacher = torch.from_numpy(feats["train"].logits)
    labels = torch.from_numpy(data.train.labels)
    heads: list[HeadWeights] = []
    val_acc: list[float] = []
    test_acc: list[float] = []
    for k, pooled in enumerate(feats["train"].pooled):
        x = torch.from_numpy(pooled)
        mean, std = x.mean(0), x.std(0) + 1e-6
        fc1, fc2 = nn.Linear(x.shape[1], o.hidden), nn.Linear(o.hidden, classes)
        net = nn.Sequential(fc1, nn.ReLU(), fc2)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, o.epochs)
        task = bar.add_task(f"exit {k + 1} head", total=o.epochs)
        xs = (x - mean) / std
        t = o.temperature
        for _ in range(o.epochs):
            for idx in torch.randperm(len(xs)).split(256):
                out = net(xs[idx])
                loss = F.cross_entropy(out, labels[idx])
                if o.distill:
                    kd = F.kl_div(F.log_softmax(out / t, -1), F.softmax(teacher[idx] / t, -1),
                                  reduction="batchmean") * t * t
                    loss = (1 - o.distill) * loss + o.distill * kd
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            bar.update(task, advance=1)
        # the input standardisation folded into the first layer: the head reads raw averages
        w1 = fc1.weight.detach() / std
        b1 = fc1.bias.detach() - (fc1.weight.detach() * (mean / std)).sum(1)
        heads.append(HeadWeights(w1.numpy(), b1.numpy(), fc2.weight.detach().numpy(),
                                 fc2.bias.detach().numpy(), kernels[k]))
        with torch.no_grad():
            for split, acc in (("val", val_acc), ("test", test_acc)):
                out = net((torch.from_numpy(feats[split].pooled[k]) - mean) / std)
                acc.append(float((out.argmax(1).numpy() == data.split(split).labels).mean()))
    for split, acc in (("val", val_acc), ("test", test_acc)):
        acc.append(float((feats[split].logits.argmax(1) == data.split(split).labels).mean()))
    return heads, val_acc, test_acc


def _write_segments(o: ImportOptions, graph: Graph, chosen: list[Cut], pieces: list[Path],
                    heads: list[HeadWeights]) -> None:
    import onnx

    for k, path in enumerate(pieces, start=1):
        piece = onnx.load(str(path))
        last = k == len(pieces)
        end = graph.output if last else chosen[k - 1].tensor
        graft_exit(piece, end, None if last else heads[k - 1], graph.classes, f"exit{k}",
                   () if last else chosen[k - 1].shape)
        onnx.save(piece, str(o.out / f"segment-{k}.onnx"))


def _write_manifest(o: ImportOptions, graph: Graph, chosen: list[Cut], total: int,
                    spec: InputSpec, data: Dataset, val_acc: list[float],
                    test_acc: list[float]) -> Bundle:
    shapes = [graph.input_shape, *(c.shape for c in chosen)]
    flops_at = [0, *(c.flops for c in chosen), total]
    segments = []
    for k in range(1, len(chosen) + 2):
        last = k == len(chosen) + 1
        act = None if last else chosen[k - 1]
        segments.append(SegmentSpec(
            k, f"segment-{k}.onnx", k - 1, k - 1, TensorSpec("x", (-1, *shapes[k - 1])),
            None if act is None else TensorSpec("act", (-1, *act.shape)),
            TensorSpec("logits", (-1, graph.classes)),
            TensorSpec("embedding", (-1, graph.classes)), flops_at[k] - flops_at[k - 1],
            0 if act is None else act.bytes))
    digest = hashlib.sha256(o.model.read_bytes()).hexdigest()[:12]
    manifest = Manifest(
        o.name or o.model.stem.replace(" ", "-"), "onnx",
        {"source": o.model.name, "sha256": digest, "cuts": [c.tensor for c in chosen]},
        data.classes, spec,
        [{"index": k, "name": c.tensor, "channels": c.shape[0]} for k, c in enumerate(chosen)],
        [{"index": k, "model_exit": k, "after_block": k - 1} for k in range(1, len(chosen) + 2)],
        segments, "full.onnx", total, rows_model=ROWS_MODEL,
        metrics={"dataset": o.dataset, "data_dir": o.data_dir, "imported_from": o.model.name,
                 "val_exit_accuracy": val_acc, "test_exit_accuracy": test_acc,
                 "train_images": len(data.train.images)})
    (o.out / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=1))
    return load_bundle(o.out)


def _verify(bundle: Bundle, original: Path, x: np.ndarray) -> None:
    """The chained segments' final logits, and ``full.onnx``'s, are the original file's,
    frame by frame."""
    session = make_session(original)
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    full = make_session(bundle.path("full.onnx")).run(None, {"x": x})[0]
    if not np.allclose(full, want, atol=ATOL, rtol=1e-3):
        raise OfframpError(f"full.onnx differs from the original model by "
                           f"{float(np.abs(full - want).max()):.2e}")
    h = x
    for seg in bundle.manifest.segments:
        out = make_session(bundle.path(seg.file)).run(None, {"x": h})
        h = out[0]
    if not np.allclose(h, want, atol=ATOL, rtol=1e-3):
        raise OfframpError(f"the chained segments differ from the original model by "
                           f"{float(np.abs(h - want).max()):.2e}")
