"""Export a trained multi-exit model to a model bundle: one ONNX file per segment.

Cut points are chosen at export time among the model's exits (``cuts``, 1-based exit numbers;
the final exit is always one), so one trained model exports as 2, 3 or K segments. Segment k
runs the blocks after the previous cut up to its cut and that cut's exit head; exits that are
not cuts are left out of that bundle. Outputs per segment: ``act`` (the activation for the next
segment; not on the last), ``logits`` and ``embedding`` (L2-normalised pre-logit vector).

Every export is checked: ``onnx.checker``, ONNX Runtime against torch for every segment, and
the chained segments against the whole model (tolerances :data:`ATOL`, :data:`RTOL`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from offramp.errors import OfframpError
from offramp.ml.flops import count_flops
from offramp.ml.zoo import MultiExitNet
from offramp.model.bundle import Bundle, Manifest, SegmentSpec, TensorSpec, load_bundle
from offramp.model.inputs import InputSpec
from offramp.model.sessions import FullModelRunner, SegmentRunner, make_session

ATOL = 1e-4
RTOL = 1e-3
OPSET = 17
ROWS_MODEL = "rows.onnx"


class ExportError(OfframpError):
    """An export that failed, or whose ONNX outputs do not match torch."""


class SegmentModule(nn.Module):
    """Blocks ``first..last`` and one exit head, as exported."""

    def __init__(self, model: MultiExitNet, first: int, last: int, head: nn.Module,
                 final: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[first:last + 1])
        self.head = head
        self.final = final

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for block in self.blocks:
            x = block(x)
        logits, hidden = self.head(x)
        emb = F.normalize(hidden, dim=-1)
        return (logits, emb) if self.final else (x, logits, emb)


class FullModule(nn.Module):
    """The whole backbone and the final head only: the monolithic baseline."""

    def __init__(self, model: MultiExitNet) -> None:
        super().__init__()
        self.blocks = model.blocks
        self.head = model.heads[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(x)[0]
        return logits


def _export(module: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    axes = {"x": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _check(name: str, got: Sequence[np.ndarray], want: Sequence[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        if not np.allclose(g, w.detach().numpy(), atol=ATOL, rtol=RTOL):
            err = float(np.abs(g - w.detach().numpy()).max())
            raise ExportError(f"{name}: ONNX Runtime differs from torch by {err:.2e} "
                              f"(tolerance atol={ATOL}, rtol={RTOL})")


def export_bundle(model: MultiExitNet, out: Path, *, name: str, classes: list[str],
                  spec: InputSpec, cuts: Sequence[int] | None = None,
                  metrics: dict[str, Any] | None = None) -> Bundle:
    """Write ``out/manifest.json`` and the ONNX files; return the loaded, checked bundle."""
    model = model.cpu().eval()
    k = model.num_exits
    chosen = sorted(set(cuts or range(1, k + 1)) | {k})
    if chosen[0] < 1 or chosen[-1] > k:
        raise ExportError(f"cuts must be exit numbers 1..{k}, got {list(cuts or [])}")
    out.mkdir(parents=True, exist_ok=True)
    example = torch.randn(4, *spec.shape, generator=torch.Generator().manual_seed(0))
    blocks_info = [{"index": i, "name": f.name, "channels": f.channels, "reduction": f.reduction}
                   for i, f in enumerate(model.feature_info)]
    segments: list[SegmentSpec] = []
    exits: list[dict[str, Any]] = []
    x = example
    first = 0
    with torch.no_grad():
        for seg_no, exit_no in enumerate(chosen, start=1):
            last = model.exit_blocks[exit_no - 1]
            final = exit_no == k
            module = SegmentModule(model, first, last, model.heads[exit_no - 1], final).eval()
            names = ["logits", "embedding"] if final else ["act", "logits", "embedding"]
            path = out / f"segment-{seg_no}.onnx"
            _export(module, x, path, names)
            want = module(x)
            flops = count_flops(module, partial(module, x))
            act = None if final else want[0]
            segments.append(SegmentSpec(
                seg_no, path.name, first, last, TensorSpec("x", (-1, *x.shape[1:])),
                None if act is None else TensorSpec("act", (-1, *act.shape[1:])),
                TensorSpec("logits", (-1, model.num_classes)),
                TensorSpec("embedding", (-1, model.embed_dim)), flops,
                0 if act is None else int(act[0].numel() * 4)))
            exits.append({"index": seg_no, "model_exit": exit_no, "after_block": last})
            x = act if act is not None else x
            first = last + 1
        full = FullModule(model).eval()
        _export(full, example, out / "full.onnx", ["logits"])
        full_flops = count_flops(full, lambda: full(example))
    write_rows_model(out / ROWS_MODEL)
    manifest = Manifest(name, model.arch, model.config, classes, spec, blocks_info, exits,
                        segments, "full.onnx", full_flops, metrics=dict(metrics or {}),
                        rows_model=ROWS_MODEL)
    (out / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=1))
    bundle = load_bundle(out)
    verify_bundle(bundle, model, example)
    return bundle


def write_rows_model(path: Path) -> None:
    """``y = x[rows]`` for a float tensor of any shape: how a worker drops the samples that
    exited from a batch kept on the GPU, and gathers the rest for the next segment
    (:mod:`offramp.model.resident`)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["x", "rows"], ["y"], axis=0)], "rows",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
         onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.INT64, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    opsets = [onnx.helper.make_opsetid("", OPSET)]
    # The oldest IR version the opset allows, as torch's export writes it: make_model's default
    # is the installed onnx's newest, which an older onnxruntime (Jetson wheels) refuses.
    model = onnx.helper.make_model(graph, opset_imports=opsets,
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets))
    onnx.save(model, str(path))  # not onnx.checker's: it wants a rank, and x may have any


def verify_bundle(bundle: Bundle, model: MultiExitNet, example: torch.Tensor) -> None:
    """ONNX Runtime vs torch for every segment, and the chain vs the whole model."""
    cuts = [e["model_exit"] for e in bundle.manifest.exits]
    with torch.no_grad():
        outs = model(example)
    x = example.numpy()
    for seg in bundle.manifest.segments:
        got = SegmentRunner(bundle, seg.index).run(x)
        logits, hidden = outs[cuts[seg.index - 1] - 1]
        _check(f"segment {seg.index}", [got.logits, got.embedding],
               [logits, F.normalize(hidden, dim=-1)])
        if got.activation is not None:
            x = got.activation
    final = outs[-1][0]
    rows_model = bundle.rows_model()
    if rows_model is not None:
        rows = np.array([len(example) - 1, 0], np.int64)
        got_rows = make_session(rows_model).run(None, {"x": example.numpy(), "rows": rows})[0]
        _check("rows.onnx", [got_rows], [example[torch.from_numpy(rows)]])
    _check("chained segments vs whole model", [got.logits], [final])
    _check("full.onnx vs whole model", [FullModelRunner(bundle).run(example.numpy())], [final])
