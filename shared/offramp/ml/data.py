"""Datasets as RGB uint8 images (N, H, W, 3) plus labels, with fixed seeded splits.

- ``digits``: scikit-learn's bundled handwritten digits (real data, nothing downloaded), 8x8
  grey levels 0..16 scaled to 0..255 and resized to the input size.
- ``cifar10``: a local directory in the standard python-pickle layout (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``); the last 5,000 training images are the validation split.
- ``imagefolder``: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``.

Images go through :func:`offramp.model.inputs.normalise`, the same function the
admission-controller applies, so a PNG published at ingest is seen exactly as in training.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offramp.errors import OfframpError
from offramp.model.images import decode_image, resize_uint8

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TRUSTED_PIXELS = 1 << 27  # a training folder is the user's own: photos up to ~134 MP


class DatasetError(OfframpError):
    """A dataset that is missing or not in the expected layout."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise DatasetError(f"split {name!r} is not one of {', '.join(SPLITS)}")
        split: Split = getattr(self, name)
        return split


def _seeded_split(images: np.ndarray, labels: np.ndarray, seed: int,
                  fractions: tuple[float, float] = (0.6, 0.2)) -> tuple[Split, Split, Split]:
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train = int(len(order) * fractions[0])
    n_val = int(len(order) * fractions[1])
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return tuple(Split(images[p], labels[p].astype(np.int64)) for p in parts)  # type: ignore[return-value]


def load_digits(size: int = 32, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    grey = np.clip(raw.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (N, 8, 8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    images = resize_uint8(rgb, size, size)
    train, val, test = _seeded_split(images, raw.target, seed)
    return Dataset("digits", [str(c) for c in range(10)], train, val, test)


def _unpickle(path: Path) -> dict[bytes | str, object]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {path} is missing (expected the python-pickle layout: "
                           "data_batch_1..5, test_batch, batches.meta)")
    try:
        with path.open("rb") as f:
            data: dict[bytes | str, object] = pickle.load(f, encoding="bytes")  # trusted local dataset files
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a CIFAR-10 pickle ({exc})") from None
    return data


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data, labels = d.get(b"data"), d.get(b"labels")
    if not isinstance(data, np.ndarray) or labels is None or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: expected 'data' (N, 3072) uint8 and 'labels'")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)
    return images, np.asarray(labels, np.int64)


def load_cifar10(root: str | Path, size: int = 32, val_size: int = 5000) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 directory {root} does not exist")
    batches = sorted(root.glob("data_batch_*"))
    if not batches:
        raise DatasetError(f"no data_batch_* files in {root} (expected the CIFAR-10 python layout)")
    parts = [_cifar_batch(p) for p in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _cifar_batch(root / "test_batch")
    meta = _unpickle(root / "batches.meta")
    names = meta.get(b"label_names")
    classes = ([n.decode() if isinstance(n, bytes) else str(n) for n in names]
               if isinstance(names, list) else [str(i) for i in range(10)])
    val_size = min(val_size, len(labels) // 5)
    images, test_images = resize_uint8(images, size, size), resize_uint8(test_images, size, size)
    return Dataset("cifar10", classes, Split(images[:-val_size], labels[:-val_size]),
                   Split(images[-val_size:], labels[-val_size:]), Split(test_images, test_labels))


def _read_tree(root: Path, classes: list[str], size: int) -> Split:
    images, labels = [], []
    for idx, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    img = decode_image(path.read_bytes(), max_pixels=TRUSTED_PIXELS)
                except OfframpError as exc:
                    raise DatasetError(f"{path}: {exc}") from None
                images.append(resize_uint8(img[None], size, size)[0])
                labels.append(idx)
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}/<class>/")
    return Split(np.stack(images), np.asarray(labels, np.int64))


def load_imagefolder(root: str | Path, size: int = 32, seed: int = 0) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
    if all((root / s).is_dir() for s in SPLITS):
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train, val, test = (_read_tree(root / s, classes, size) for s in SPLITS)
        return Dataset(root.name, classes, train, val, test)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"{root} needs at least two class folders ({root}/<class>/<image>)")
    whole = _read_tree(root, classes, size)
    train, val, test = _seeded_split(whole.images, whole.labels, seed, (0.7, 0.15))
    return Dataset(root.name, classes, train, val, test)


def load_dataset(name: str, root: str | Path | None = None, size: int = 32,
                 seed: int = 0) -> Dataset:
    if name == "digits":
        return load_digits(size, seed)
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a directory (--data-dir)")
    if name == "cifar10":
        return load_cifar10(root, size)
    if name == "imagefolder":
        return load_imagefolder(root, size, seed)
    raise DatasetError(f"unknown dataset {name!r}; one of digits, cifar10, imagefolder")
