"""Datasets as RGB uint8 images (N, H, W, 3) plus labels, with fixed seeded splits.

- ``digits``: scikit-learn's bundled handwritten digits (real data, nothing downloaded), 8x8
  grey levels 0..16 scaled to 0..255 and resized to the input size.
- ``fashion-mnist``: Zalando's Fashion-MNIST (28x28 grey, 10 classes) from MNIST-format idx
  files, by default where Debian's package ``dataset-fashion-mnist`` puts them; the official
  60,000/10,000 train/test split, validation carved from train with the seed.
- ``cifar10``: a local directory in the standard python-pickle layout (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``); the last 5,000 training images are the validation split.
- ``imagefolder``: ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``.

Images go through :func:`offramp.model.inputs.normalise`, the same function the
admission-controller applies, so a PNG published at ingest is seen exactly as in training.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offramp.errors import OfframpError
from offramp.model.images import decode_image, resize_uint8

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TRUSTED_PIXELS = 1 << 27  # a training folder is the user's own: photos up to ~134 MP
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]
MEMORY_LIMIT = 8 << 30  # resized images held at once; above it a smaller --train-limit is asked for


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


IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
                             0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An array from an MNIST-format idx file (gzip-compressed or not): two zero bytes, a type
    code, the number of dimensions, one big-endian uint32 per dimension, then the data."""
    try:
        raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise DatasetError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DatasetError(f"{path}: header says {shape} of {dtype}, data has {len(body)} bytes")
    return np.frombuffer(body, dtype).reshape(shape)


def _idx_pair(root: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    def find(name: str) -> Path:
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
        hint = (f" (Debian: apt-get install {FASHION_PACKAGE})" if root == FASHION_DIR else "")
        raise DatasetError(f"{root / name}.gz is missing{hint}")

    images = read_idx(find(f"{stem}-images-idx3-ubyte"))
    labels = read_idx(find(f"{stem}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{root}: {stem} images {images.shape} and labels {labels.shape} "
                           "do not pair up")
    return images, labels.astype(np.int64)


def load_fashion_mnist(root: str | Path | None = None, size: int = 32, seed: int = 0,
                       val_size: int = 5000, splits: tuple[str, ...] = SPLITS,
                       train_limit: int | None = None) -> Dataset:
    """Fashion-MNIST (or any MNIST-format folder: ``train-images-idx3-ubyte[.gz]`` and its
    three siblings) as RGB at ``size``; ``val_size`` training images, chosen with ``seed``,
    become the validation split. Splits not in ``splits`` are left empty (a 224 px test split
    without 9 GB of training images); ``train_limit`` picks training images as :func:`limit`
    does, before they are resized. A test split alone needs only the two ``t10k`` files."""
    root = Path(root) if root is not None else FASHION_DIR
    test_x, test_y = _idx_pair(root, "t10k")
    if {"train", "val"} & set(splits):
        train_x, train_y = _idx_pair(root, "train")
    else:
        train_x, train_y = test_x[:0], test_y[:0]
    order = np.random.default_rng(seed).permutation(len(train_y))
    val, train = order[:val_size], order[val_size:]
    if train_limit is not None and train_limit < len(train):
        train = train[_pick(len(train), train_limit, seed)]

    def rgb(grey: np.ndarray, labels: np.ndarray, split: str) -> Split:
        if split not in splits:
            return Split(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64))
        check_memory(len(labels) * size * size * 3, "fashion-mnist")
        out = np.empty((len(labels), size, size, 3), np.uint8)
        for s in range(0, len(labels), 4096):  # resize in slices: the RGB copy stays small
            part = np.repeat(grey[s:s + 4096, :, :, None], 3, axis=-1)
            out[s:s + 4096] = resize_uint8(part, size, size)
        return Split(out, labels)

    classes = FASHION_CLASSES if root == FASHION_DIR else [str(c) for c in range(10)]
    return Dataset("fashion-mnist", classes, rgb(train_x[train], train_y[train], "train"),
                   rgb(train_x[val], train_y[val], "val"), rgb(test_x, test_y, "test"))


def check_memory(nbytes: int, name: str) -> None:
    if nbytes > MEMORY_LIMIT:
        raise DatasetError(f"{name} at this input size needs {nbytes / 2**30:.1f} GiB of images; "
                           f"the limit is {MEMORY_LIMIT / 2**30:.0f} GiB: use a smaller input "
                           "size or --train-limit")


def limit(data: Dataset, train: int | None, seed: int = 0) -> Dataset:
    """The first ``train`` training images of a seeded shuffle (validation and test unchanged)."""
    if train is None or train >= len(data.train):
        return data
    pick = _pick(len(data.train), train, seed)
    return Dataset(data.name, data.classes,
                   Split(data.train.images[pick], data.train.labels[pick]), data.val, data.test)


def _pick(total: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed + 1).permutation(total)[:count])


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    folder: str  # where it is looked for; "" when it ships with a Python package
    native_size: int = 0  # the side its images come at (0: any); larger sizes are resized up


DATASETS = {
    "digits": DatasetInfo("digits", "scikit-learn's 8x8 handwritten digits, 1,797 images, "
                          "10 classes; seeded 60/20/20 split", "", 8),
    "fashion-mnist": DatasetInfo("fashion-mnist", "Fashion-MNIST, 28x28 grey, 60,000 train / "
                                 "10,000 test, 10 classes; any MNIST-format idx folder with "
                                 "--data-dir", f"{FASHION_DIR} ({FASHION_PACKAGE})", 28),
    "cifar10": DatasetInfo("cifar10", "CIFAR-10 in the python-pickle layout, 32x32, 50,000 "
                           "train / 10,000 test", "--data-dir (required)", 32),
    "imagefolder": DatasetInfo("imagefolder", "any folder of class sub-folders of images (or "
                               "train/ val/ test/ of them), any image size",
                               "--data-dir (required)"),
}


def load_dataset(name: str, root: str | Path | None = None, size: int = 32,
                 seed: int = 0, splits: tuple[str, ...] = SPLITS,
                 train_limit: int | None = None) -> Dataset:
    """``splits``: the splits needed; a large dataset may leave the others empty.
    ``train_limit``: train on this many images (a seeded choice, :func:`limit`)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root, size, seed, splits=splits, train_limit=train_limit)
    return limit(_load(name, root, size, seed), train_limit, seed)


def _load(name: str, root: str | Path | None, size: int, seed: int) -> Dataset:
    if name == "digits":
        return load_digits(size, seed)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a directory (--data-dir)")
    if name == "cifar10":
        return load_cifar10(root, size)
    return load_imagefolder(root, size, seed)
