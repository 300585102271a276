"""Reading a foreign ONNX classifier as a chain: where it can be cut, and its pieces.

Exporters compute padding and reshapes from the activations' shapes at run time
(EfficientNet-Lite's "same" padding: a Shape, Gather, Sub, Div, Pad chain per convolution), so
small shape tensors stay alive across whole stretches of the graph. They are folded first
(:func:`fold_shapes`): ONNX Runtime computes each of them at two batch sizes, and the ones
that do not depend on the batch become constants. (onnxslim folds them too, but changed
EfficientNet-Lite0's logits by 1.7 in onnxslim 0.1.98; values computed by the runtime that
serves the model cannot be wrong that way.) That leaves the activations flowing between
layers. A cut point is then a tensor through which everything
flows: after the node that makes it, in the graph's topological order, it is the only
computed tensor that later nodes still read (weights and constants aside). Cutting there
loses nothing, so segment k is exactly the simplified graph between cut k-1 and cut k,
extracted with onnx's ``Extractor``. Only 4-D activations (N, C, H, W) are offered, since an
exit head pools them.

Exit heads are grafted onto a piece as plain ONNX nodes (AveragePool to a 2 x 2 grid, or
GlobalAveragePool; Flatten, Gemm, Relu, Gemm, Softmax: every opset since 13 has them), so a
piece keeps the opset of the file it came from. Each piece's tensors are named as every
bundle names them: input ``x``, outputs ``act`` (not on the last), ``logits`` and
``embedding`` (for an imported model, its class probabilities: what the feature-difference
criterion compares between exits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from offramp.errors import OfframpError

MIN_OPSET = 13


class GraphError(OfframpError):
    """A foreign ONNX model that cannot be split or imported, and why."""


@dataclass(frozen=True)
class Graph:
    """What the importer needs to know of a foreign classifier."""

    model: onnx.ModelProto  # simplified, with shapes inferred
    input: str
    output: str
    input_shape: tuple[int, ...]  # per sample: (C, H, W)
    classes: int
    opset: int


@dataclass(frozen=True)
class Cut:
    """A tensor the graph can be cut at."""

    tensor: str
    shape: tuple[int, ...]  # per sample (C, H, W)
    flops: int  # of the nodes up to and including the one that makes it, per sample
    position: int  # that node's index in the graph

    @property
    def bytes(self) -> int:
        return 4 * math.prod(self.shape)


def read_graph(path: Path) -> Graph:
    """Load ``path`` and check that it is an image classifier offramp can split: one float
    input (N, C, H, W) with C, H and W fixed, one output (N, classes), opset 13 or later."""
    if not path.is_file():
        raise GraphError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, DecodeError,
            OSError, ValueError) as exc:
        raise GraphError(f"{path}: not a valid ONNX model ({exc})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise GraphError(f"{path}: opset {opset}; convert it to {MIN_OPSET} or later "
                           "(onnx.version_converter.convert_version)")
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise GraphError(f"{path}: {len(inputs)} inputs and {len(model.graph.output)} "
                           "outputs; an image classifier has one of each")
    shape = _dims(inputs[0].type)
    if len(shape) != 4 or any(d <= 0 for d in shape[1:]):
        raise GraphError(f"{path}: input {inputs[0].name} has shape {shape}; expected "
                           "(batch, channels, height, width) with the last three fixed")
    out = _dims(model.graph.output[0].type)
    if len(out) != 2 or out[1] <= 0:
        raise GraphError(f"{path}: output {model.graph.output[0].name} has shape {out}; "
                           "expected (batch, classes)")
    model = onnx.shape_inference.infer_shapes(fold_shapes(model, inputs[0].name, shape[1:]))
    return Graph(model, inputs[0].name, model.graph.output[0].name, tuple(shape[1:]), out[1],
                 opset)


SHAPE_SOURCES = ("Shape", "Size")


def fold_shapes(model: onnx.ModelProto, input_name: str, per_sample: Sequence[int]
                ) -> onnx.ModelProto:
    """``model`` with every tensor computed from activations' shapes alone, and the same at
    any batch size, replaced by a constant (the nodes that made only such tensors removed)."""
    import onnxruntime as ort

    g = model.graph
    constant = {i.name for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            constant.update(node.output)
    shape_only: list[str] = []
    known = set(constant)
    for node in g.node:
        if node.op_type in SHAPE_SOURCES or (node.op_type != "Constant" and node.input and all(
                not name or name in known for name in node.input)):
            shape_only += [o for o in node.output if o]
            known.update(node.output)
    shape_only = [t for t in shape_only if t not in constant]
    if not shape_only:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = {v.name: v for v in [*g.value_info, *g.output]}
    missing = [t for t in shape_only if t not in types]
    if missing:
        raise GraphError(f"shape inference gave no type for {missing[:3]}: the graph cannot be "
                         "split")
    probe.graph.output.extend(types[t] for t in shape_only)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not a warning per unused initializer of the probe
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values = []
    for batch in (1, 2):
        x = np.zeros((batch, *per_sample), np.float32)
        values.append(dict(zip(shape_only, session.run(shape_only, {input_name: x}), strict=True)))
    fixed = {t for t in shape_only if np.array_equal(values[0][t], values[1][t])}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.extend(numpy_helper.from_array(values[0][t], t) for t in sorted(fixed))
    nodes = [n for n in out.graph.node if not (n.output and all(o in fixed for o in n.output
                                                                 if o))]
    used = {o.name for o in out.graph.output}
    live = []
    for node in reversed(nodes):  # what no output needs any more goes: the Shape nodes
        if any(o in used for o in node.output):
            live.append(node)
            used.update(node.input)
    del out.graph.node[:]
    out.graph.node.extend(reversed(live))
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    del out.graph.value_info[:]
    onnx.checker.check_model(out)
    return out


def _dims(t: onnx.TypeProto) -> list[int]:
    """A tensor type's dimensions, -1 where one is not a fixed number."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in t.tensor_type.shape.dim]


def cuts(graph: Graph) -> tuple[list[Cut], int]:
    """Every cut point in order, and the whole graph's FLOPs per sample."""
    g = graph.model.graph
    shapes = {v.name: _dims(v.type) for v in [*g.value_info, *g.input, *g.output]}
    shapes.update({i.name: list(i.dims) for i in g.initializer})
    constant = {i.name for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            constant.update(node.output)
    last_use: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            if name and name not in constant:
                last_use[name] = i
    for out in g.output:
        last_use[out.name] = len(g.node)
    live = {graph.input}
    found: list[Cut] = []
    total = 0
    for i, node in enumerate(g.node):
        total += node_flops(node, shapes)
        live.update(o for o in node.output if o and o not in constant and o in last_use)
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1 and i < len(g.node) - 1:
            (tensor,) = live
            dims = shapes.get(tensor, [])
            if tensor != graph.input and len(dims) == 4 and all(d > 0 for d in dims[1:]):
                found.append(Cut(tensor, tuple(dims[1:]), total, i))
    return found, total


def node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-adds x 2 per sample of a convolution or a matrix product; 0 for other nodes
    (cheap next to them in a CNN)."""
    out = shapes.get(node.output[0]) if node.output else None
    if not out or any(d <= 0 for d in out[1:]):
        return 0
    if node.op_type == "Conv":
        w = shapes.get(node.input[1], [])
        if len(w) < 3:
            return 0
        return 2 * math.prod(out[1:]) * math.prod(w[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0], [])
        return 2 * math.prod(out[1:]) * (a[-1] if a and a[-1] > 0 else 0)
    return 0


def extract(graph: Graph, start: str, end: str, out: Path) -> onnx.ModelProto:
    """The piece of the graph from tensor ``start`` to tensor ``end`` (onnx's own extractor),
    its input renamed ``x``, written to ``out``."""
    piece = onnx.utils.Extractor(graph.model).extract_model([start], [end])
    _rename_input(piece, start, "x")
    onnx.save(piece, str(out))
    return piece


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims:  # a batch of any size: the workers batch frames
        dims[0].Clear()
        dims[0].dim_param = "batch"


@dataclass(frozen=True)
class HeadWeights:
    """An exit head's layers, as torch's ``nn.Linear`` keeps them ((out, in) and (out,)), and
    its pooling: to a 2 x 2 grid by averaging ``kernel`` x ``kernel`` squares (0: a global
    average)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    kernel: int = 0


def grid_kernel(shape: tuple[int, ...]) -> int:
    """The pooling of a head on an activation of ``shape`` (C, H, W): a 2 x 2 grid of
    averages where H and W are even and equal (an early exit needs where as well as what),
    else 0, a global average."""
    _, h, w = shape
    return h // 2 if h == w and h >= 2 and h % 2 == 0 else 0


def pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """What a head's pooling computes, flattened as ONNX's Flatten does: (N, C*4) or (N, C)."""
    if not kernel:
        return x.mean(axis=(2, 3))
    n, c = x.shape[:2]
    return x.reshape(n, c, 2, kernel, 2, kernel).mean(axis=(3, 5)).reshape(n, c * 4)


RESERVED = ("act", "logits", "embedding")  # a bundle's output names


def graft_exit(piece: onnx.ModelProto, cut: str, head: HeadWeights | None, classes: int,
               prefix: str, act_shape: tuple[int, ...] = ()) -> onnx.ModelProto:
    """``piece`` with its outputs named as a bundle names them. With ``head`` (a segment
    that ends at ``cut``): ``act`` (the cut tensor), and ``logits`` and ``embedding`` of the
    head on it. Without (the last segment): ``logits`` (its output, ``cut``) and
    ``embedding``. ``act_shape``: the cut's shape per sample. A tensor of the piece already
    named so is renamed first."""
    g = piece.graph
    for name in RESERVED:
        if name == cut:
            cut = f"{prefix}_source_{name}"
            _rename_tensor(piece, name, cut)
        elif any(name in n.output for n in g.node):
            _rename_tensor(piece, name, f"{prefix}_source_{name}")
    nodes: list[onnx.NodeProto] = []
    p = f"{prefix}_"
    if head is None:
        nodes.append(helper.make_node("Identity", [cut], ["logits"], name=p + "logits"))
    else:
        for name, array in (("w1", head.w1), ("b1", head.b1), ("w2", head.w2), ("b2", head.b2)):
            g.initializer.append(numpy_helper.from_array(array.astype(np.float32), p + name))
        nodes += [
            helper.make_node("Identity", [cut], ["act"], name=p + "act"),
            helper.make_node("AveragePool", [cut], [p + "pooled"], name=p + "pool",
                             kernel_shape=[head.kernel] * 2, strides=[head.kernel] * 2)
            if head.kernel else
            helper.make_node("GlobalAveragePool", [cut], [p + "pooled"], name=p + "pool"),
            helper.make_node("Flatten", [p + "pooled"], [p + "flat"], axis=1, name=p + "flat"),
            helper.make_node("Gemm", [p + "flat", p + "w1", p + "b1"], [p + "hidden"],
                             transB=1, name=p + "fc1"),
            helper.make_node("Relu", [p + "hidden"], [p + "relu"], name=p + "relu"),
            helper.make_node("Gemm", [p + "relu", p + "w2", p + "b2"], ["logits"], transB=1,
                             name=p + "fc2")]
    nodes.append(helper.make_node("Softmax", ["logits"], ["embedding"], axis=1,
                                  name=p + "probabilities"))
    g.node.extend(nodes)
    del g.output[:]
    if head is not None:
        g.output.append(helper.make_tensor_value_info("act", onnx.TensorProto.FLOAT,
                                                      ["batch", *act_shape]))
    g.output.extend([
        helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", classes]),
        helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", classes])])
    onnx.checker.check_model(piece)
    return piece


def _rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for value in [*model.graph.output, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def plain_copy(graph: Graph, out: Path) -> None:
    """The foreign model whole, input ``x`` and output ``logits``: the bundle's full model."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.value_info[:]
    _rename_input(model, graph.input, "x")
    output = graph.output
    if output == "logits":
        output = "imported_source_logits"
        _rename_tensor(model, "logits", output)
    model.graph.node.append(helper.make_node("Identity", [output], ["logits"],
                                             name="imported_logits"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(
        "logits", onnx.TensorProto.FLOAT, ["batch", graph.classes]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
