"""Datasets: the real digits split, and tiny CIFAR-10 / image-folder trees built here."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offramp.ml.data import DatasetError, load_dataset, load_digits

pytestmark = pytest.mark.tier("inproc")


def test_digits_split_is_fixed_and_complete() -> None:
    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.val), len(a.test)) == (1078, 359, 360)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert a.train.images.shape[1:] == (32, 32, 3) and a.train.images.dtype == np.uint8
    assert set(a.train.labels.tolist()) == set(range(10))


def _cifar_tree(root: Path, n: int = 20) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"] * 10}))


def test_cifar10_pickle_layout_loads(tmp_path: Path) -> None:
    _cifar_tree(tmp_path / "cifar")
    ds = load_dataset("cifar10", tmp_path / "cifar")
    assert len(ds.train) + len(ds.val) == 40 and len(ds.test) == 20
    assert ds.classes[0] == "cat" and ds.train.images.shape[1:] == (32, 32, 3)


@pytest.mark.parametrize(("setup", "words"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no data_batch_"),
    (lambda p: (p.mkdir(), (p / "data_batch_1").write_bytes(b"garbage")), "not a CIFAR-10 pickle"),
    (lambda p: (p.mkdir(), (p / "data_batch_1").write_bytes(pickle.dumps({b"data": 1}))),
     "expected 'data'"),
])
def test_bad_cifar10_is_one_clear_error(tmp_path: Path, setup: object, words: str) -> None:
    root = tmp_path / "c"
    setup(root)  # type: ignore[operator]
    with pytest.raises(DatasetError, match=words):
        load_dataset("cifar10", root)


def test_imagefolder_loads_and_rejects_bad_trees(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(root / cls / f"{i}.png")
    ds = load_dataset("imagefolder", root, size=16)
    assert ds.classes == ["cat", "dog"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20
    assert ds.train.images.shape[1:] == (16, 16, 3)
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        load_dataset("imagefolder", root)
    with pytest.raises(DatasetError, match="at least two class folders"):
        load_dataset("imagefolder", root / "cat")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist", root)
