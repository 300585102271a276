"""Export, bundles and the ONNX runtime, on models built in this test session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from offramp.ml.data import load_digits
from offramp.ml.export import ATOL, RTOL, export_bundle
from offramp.ml.zoo import create_model
from offramp.model.bundle import Bundle, BundleError, load_bundle
from offramp.model.inputs import InputSpec, normalise
from offramp.model.sessions import FullModelRunner, SegmentRunner, cuda_available

pytestmark = pytest.mark.tier("inproc")

CLASSES = [str(i) for i in range(10)]


def _chain(bundle: Bundle, x: np.ndarray) -> list[np.ndarray]:
    logits = []
    for seg in bundle.manifest.segments:
        out = SegmentRunner(bundle, seg.index).run(x)
        logits.append(out.logits)
        if out.activation is not None:
            x = out.activation
    return logits


@pytest.mark.parametrize(("name", "cuts"), [("resnet20", None), ("wrn16_4", (1,)),
                                            ("mobilenetv2", (2,))])
def test_any_cut_exports_and_chains_to_the_whole_model(tmp_path: Path, name: str,
                                                       cuts: tuple[int, ...] | None) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10, width=0.5) if name == "mobilenetv2" else create_model(name, 10)
    bundle = export_bundle(model.eval(), tmp_path / name, name=name, classes=CLASSES,
                           spec=InputSpec(), cuts=cuts)
    expected_segments = model.num_exits if cuts is None else len(cuts) + 1
    assert bundle.num_segments == expected_segments
    x = np.random.default_rng(1).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x))[-1][0].numpy()
    np.testing.assert_allclose(_chain(bundle, x)[-1], want, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(FullModelRunner(bundle).run(x), want, atol=ATOL, rtol=RTOL)


def test_manifest_describes_every_segment(tiny_bundle: Bundle) -> None:
    m = tiny_bundle.manifest
    assert [s.index for s in m.segments] == list(range(1, tiny_bundle.num_segments + 1))
    assert m.segments[-1].activation is None
    for a, b in zip(m.segments, m.segments[1:], strict=False):
        assert a.activation is not None and a.activation.per_sample == b.input.per_sample
        assert b.first_block == a.last_block + 1
        assert a.activation_bytes == 4 * int(np.prod(a.activation.per_sample))
    assert sum(s.flops for s in m.segments) > m.full_flops  # exit heads cost extra
    assert m.calibration["samples"] == 359


def test_dynamic_batch_axis(tiny_bundle: Bundle) -> None:
    runner = SegmentRunner(tiny_bundle, 1)
    for n in (1, 5, 33):
        out = runner.run(np.zeros((n, 3, 32, 32), np.float32))
        assert out.logits.shape == (n, 10) and out.activation is not None
        assert out.activation.shape[0] == n
        np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, rtol=1e-4)


def test_trained_bundle_classifies_real_digits(tiny_bundle: Bundle) -> None:
    test = load_digits().test
    logits = _chain(tiny_bundle, normalise(test.images, tiny_bundle.manifest.input))
    accuracy = float((logits[-1].argmax(1) == test.labels).mean())
    assert accuracy > 0.85, accuracy


def test_wrong_input_shape_is_a_clear_error(tiny_bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="segment 2 takes"):
        SegmentRunner(tiny_bundle, 2).run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(BundleError, match=r"segments 1\.\.4, not 9"):
        tiny_bundle.segment(9)


@pytest.mark.parametrize(("damage", "words"), [
    (shutil.rmtree, "does not exist"),
    (lambda root: (root / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda root: (root / "manifest.json").write_text("{nope"), "not valid JSON"),
    (lambda root: (root / "segment-2.onnx").unlink(), "segment-2.onnx named in"),
    (lambda root: (root / "manifest.json").write_text(json.dumps({"format": 1})),
     "incomplete or malformed"),
    (lambda root: (root / "manifest.json").write_text(json.dumps({"format": 7})), "format 7"),
])
def test_broken_bundles_are_one_clear_error(tiny_bundle: Bundle, tmp_path: Path, damage: object,
                                            words: str) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_bundle.root, root)
    damage(root)  # type: ignore[operator]
    with pytest.raises(BundleError, match=words):
        load_bundle(root)


def test_corrupt_onnx_file_is_reported_at_load(tiny_bundle: Bundle, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tiny_bundle.root, root)
    (root / "segment-1.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(BundleError, match="cannot load"):
        SegmentRunner(load_bundle(root), 1)


def test_unknown_device_is_refused_and_cuda_falls_back_to_cpu(tiny_bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="device 'tpu'"):
        SegmentRunner(tiny_bundle, 1, device="tpu")
    runner = SegmentRunner(tiny_bundle, 1, device="cuda")
    assert "CPUExecutionProvider" in runner.providers
    if not cuda_available():
        assert runner.device == "cpu" and runner.providers == ["CPUExecutionProvider"]


class ShapeLog:
    """Stands in for a session's ``run`` and notes the batch size of every call."""

    def __init__(self, run: Callable[..., Any]) -> None:
        self.wrapped, self.sizes = run, []

    def __call__(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.wrapped(outputs, feeds)


def test_a_static_batch_pads_or_splits_and_answers_as_unpadded(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """What GPU workers do, checked on CPU: the session only ever sees the static batch size,
    and every real row's answer is the one it gets unpadded."""
    plain = SegmentRunner(tiny_bundle, 1)
    padded = SegmentRunner(tiny_bundle, 1)
    padded.static_batch = 8
    log = ShapeLog(padded.session.run)
    monkeypatch.setattr(padded.session, "run", log)
    x = normalise(load_digits().test.images[:20], tiny_bundle.manifest.input)
    for n in (1, 3, 8, 20):
        want, got = plain.run(x[:n]), padded.run(x[:n])
        assert got.activation is not None and want.activation is not None
        assert got.logits.shape == want.logits.shape == (n, 10)
        for g, w in ((got.logits, want.logits), (got.embedding, want.embedding),
                     (got.activation, want.activation)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert log.sizes == [8] * 6


@pytest.mark.gpu
def test_cuda_segments_run_on_the_gpu_and_agree_with_cpu(tiny_bundle: Bundle) -> None:
    """Every segment on CUDA, at the worker's batch sizes, against the same segment on CPU
    (to 1e-2: ONNX Runtime's CUDA convolutions use TF32, about 3e-3 off on these logits)."""
    x = normalise(load_digits().test.images[:64], tiny_bundle.manifest.input)
    h = x
    for spec in tiny_bundle.manifest.segments:
        cpu = SegmentRunner(tiny_bundle, spec.index)
        gpu = SegmentRunner(tiny_bundle, spec.index, device="cuda")
        assert gpu.device == "cuda", f"onnxruntime-gpu fell back to {gpu.providers}"
        gpu.static_batch = 32  # as a worker with micro-batches of up to 32 sets it
        want = cpu.run(h)
        for batch in (1, 7, 32, 64):
            got = gpu.run(h[:batch])
            np.testing.assert_allclose(got.logits, want.logits[:batch], rtol=1e-2, atol=1e-2)
            np.testing.assert_allclose(got.embedding, want.embedding[:batch], rtol=1e-2,
                                       atol=1e-2)
            assert (got.logits.argmax(1) == want.logits[:batch].argmax(1)).mean() >= 0.95
        if want.activation is not None:
            h = want.activation
