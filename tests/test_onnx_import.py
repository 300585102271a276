"""``offramp import``: an ONNX classifier offramp never saw (the tiny bundle's whole model,
read as a foreign file) split at its cut points with onnx's tools, exits trained on features
ONNX Runtime computed, and served: the final exit is the original model frame by frame, the
exits meet their calibrated target on held-out images, a running system answers with it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from offramp.client import Client
from offramp.local.client import png_bytes
from offramp.local.system import LocalSystem
from offramp.ml.calibrate import measure
from offramp.ml.data import DATASETS, load_digits
from offramp.ml.onnx_graph import GraphError, cuts, read_graph
from offramp.ml.onnx_import import Imported, ImportOptions, import_onnx
from offramp.model.bundle import Bundle
from offramp.model.images import resize_uint8
from offramp.model.inputs import normalise
from offramp.model.sessions import SegmentRunner, make_session

pytestmark = pytest.mark.tier("inproc")

FAST = {"train_limit": 800, "epochs": 15}


@pytest.fixture(scope="module")
def foreign(tiny_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("foreign") / "someone-elses-cnn.onnx"
    shutil.copy(tiny_bundle.path(tiny_bundle.manifest.full_model), path)
    return path


@pytest.fixture(scope="module")
def imported(foreign: Path, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    out = tmp_path_factory.mktemp("imported") / "bundle"
    return import_onnx(ImportOptions(foreign, "digits", out, at=(0.3, 0.6), mean=(0.5,) * 3,
                                     std=(0.5,) * 3, **FAST), show=False)


def test_the_cut_points_are_the_tensors_everything_flows_through(foreign: Path) -> None:
    graph = read_graph(foreign)
    found, total = cuts(graph)
    assert graph.input_shape == (3, 32, 32) and graph.classes == 10
    assert len(found) >= 4
    shares = [c.flops / total for c in found]
    assert shares == sorted(shares) and shares[0] > 0 and shares[-1] < 1
    assert all(len(c.shape) == 3 and c.bytes == 4 * np.prod(c.shape) for c in found)


def test_the_imported_bundle_is_the_original_model_at_its_last_exit_frame_by_frame(
        imported: Imported, foreign: Path) -> None:
    bundle = imported.bundle
    assert bundle.num_segments == 3 and bundle.manifest.arch == "onnx"
    images = load_digits().test.images
    x = normalise(images, bundle.manifest.input)
    want = make_session(foreign).run(None, {"x": x})[0]
    h = x
    for seg in bundle.manifest.segments:
        out = SegmentRunner(bundle, seg.index).run(h)
        h = out.activation if out.activation is not None else h
    assert np.allclose(out.logits, want, atol=1e-4)
    assert (out.logits.argmax(1) == want.argmax(1)).all()
    flops = [s.flops for s in bundle.manifest.segments]
    assert sum(flops) == bundle.manifest.full_flops and all(f > 0 for f in flops)


def test_the_exits_meet_their_calibrated_target_on_held_out_images(imported: Imported) -> None:
    bundle = imported.bundle
    calib = bundle.calibration()  # measured on the validation split
    target = calib.exit_accuracy()[-1] - 0.01
    thresholds = calib.thresholds_for_accuracy("confidence", target)
    held_out = measure(bundle, load_digits().test).simulate("confidence", thresholds)
    assert held_out.accuracy >= target - 0.02, (held_out, target)
    assert held_out.flops_fraction < 0.9  # the exits take frames: they pay
    assert imported.val_accuracy[0] > 0.5  # a head that learned, not chance (0.1)


def test_an_imported_bundle_is_served(imported: Imported, prefix: str,
                                      up: Callable[[LocalSystem], LocalSystem]) -> None:
    images = load_digits().test

    async def ask(url: str) -> list[str]:
        async with Client("cam-import", broker=url, prefix=prefix) as client:
            return [(await client.submit(images.images[i])).status for i in range(20)]

    with LocalSystem(imported.bundle, 2, prefix=prefix) as system:
        up(system)
        statuses = asyncio.run(ask(system.url))
    assert statuses == ["ok"] * 20


def test_a_residual_network_is_cut_between_its_blocks_and_kept_whole(
        tmp_path: Path) -> None:
    """A zoo ResNet-20 exported as a foreign file: the cut points are the blocks' outputs (no
    tensor inside a block, where the skip connection carries a second one), and the imported
    bundle's last exit is the original network frame by frame."""
    import torch

    from offramp.ml.export import FullModule
    from offramp.ml.zoo import create_model

    torch.manual_seed(0)
    path = tmp_path / "resnet20.onnx"
    net = FullModule(create_model("resnet20", 10).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the zoo's shape arithmetic
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
    found, _ = cuts(read_graph(path))
    residual = [c.tensor for c in found if c.tensor.startswith("/blocks.")
                and not c.tensor.startswith("/blocks.0/")]  # blocks.0 is the stem
    assert {t.split("/")[1] for t in residual} == {f"blocks.{i}" for i in range(1, 10)}
    assert all(t.endswith(("/Add_output_0", "/Relu_output_0")) for t in residual), residual

    done = import_onnx(ImportOptions(path, "digits", tmp_path / "bundle", at=(0.3, 0.6),
                                     mean=(0.5,) * 3, std=(0.5,) * 3, **FAST), show=False)
    x = normalise(load_digits().test.images[:64], done.bundle.manifest.input)
    h, out = x, None
    for seg in done.bundle.manifest.segments:
        out = SegmentRunner(done.bundle, seg.index).run(h)
        h = out.activation if out.activation is not None else h
    assert out is not None and done.bundle.num_segments == 3
    assert np.allclose(out.logits, make_session(path).run(None, {"x": x})[0], atol=1e-4)


def test_images_held_at_the_datasets_own_size_are_the_same_images_once_resized() -> None:
    """import keeps a dataset's images at the size they come at and resizes each batch as it
    goes in: the pixels are those of loading at the model's size (memory is not: Fashion-MNIST's
    training images at 224 px would be 8.3 GB)."""
    native = load_digits(size=DATASETS["digits"].native_size).test.images
    assert native.shape[1:] == (8, 8, 3)
    assert np.array_equal(resize_uint8(native, 32, 32), load_digits(size=32).test.images)


def test_what_cannot_be_imported_is_one_clear_error(foreign: Path, tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="no such file"):
        read_graph(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(GraphError, match="not a valid ONNX model"):
        read_graph(tmp_path / "junk.onnx")
    with pytest.raises(GraphError, match="not cut points: nowhere"):
        import_onnx(ImportOptions(foreign, "digits", tmp_path / "b", cut_at=("nowhere",)),
                    show=False)
    folder = tmp_path / "three-kinds"  # a dataset of other classes than the model's
    for kind in ("cat", "dog", "owl"):
        (folder / kind).mkdir(parents=True)
        for i in range(4):
            (folder / kind / f"{i}.png").write_bytes(png_bytes(load_digits().test.images[i]))
    with pytest.raises(GraphError, match="10 outputs and imagefolder 3 classes"):
        import_onnx(ImportOptions(foreign, "imagefolder", tmp_path / "c",
                                  data_dir=str(folder)), show=False)
    two = onnx.load(str(foreign))  # a second input that counts: not an image classifier
    two.graph.input.append(onnx.helper.make_tensor_value_info(
        "extra", onnx.TensorProto.FLOAT, [1]))
    two.graph.node.append(onnx.helper.make_node("Add", ["logits", "extra"], ["shifted"]))
    del two.graph.output[:]
    two.graph.output.append(onnx.helper.make_tensor_value_info(
        "shifted", onnx.TensorProto.FLOAT, ["batch", 10]))
    onnx.save(two, str(tmp_path / "two.onnx"))
    with pytest.raises(GraphError, match="2 inputs"):
        read_graph(tmp_path / "two.onnx")


def test_offramp_import_lists_cut_points(foreign: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "offramp.cli", "import", str(foreign),
                           "--list"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "cut points of" in done.stdout and "MFLOPs to here" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "offramp.cli", "import", str(foreign)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--dataset" in bad.stderr
