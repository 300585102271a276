"""Tensors on the wire: dtype, shape, codec and bytes, moved as buffer views, never per element.

Codecs: ``raw`` (the array's own bytes), ``fp16`` (half precision, decoded back to float32),
``int8`` (symmetric per-tensor scale), and ``ae`` (a latent from an autoencoder's encoder; the
receiver's decoder model turns it back, see :mod:`offramp.model.bundle`). A decoder checks that the
byte count matches dtype x shape before it builds an array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from offramp.errors import WireError
from offramp.wire.reader import Reader

Codec = Literal["raw", "fp16", "int8", "ae"]
CODECS: tuple[Codec, ...] = ("raw", "fp16", "int8", "ae")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
MAX_RANK = 8


def _bytes_view(array: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous array: what msgpack packs as bin without a copy."""
    return memoryview(array.data).cast("B")


@dataclass(frozen=True, slots=True)
class Tensor:
    """An encoded tensor: ``data`` holds ``shape`` elements of the codec's storage type."""

    dtype: str
    shape: tuple[int, ...]
    codec: Codec
    data: bytes | memoryview
    scale: float = 1.0

    @classmethod
    def encode(cls, array: np.ndarray, codec: Codec = "raw") -> Tensor:
        """Encode ``array``; fp16 and int8 apply to float arrays and decode back to float32."""
        if codec not in ("raw", "fp16", "int8"):
            raise ValueError(f"codec {codec!r} cannot encode a plain array")
        array = np.asarray(array)
        dtype = str(array.dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        scale = 1.0
        if codec == "fp16":
            stored = np.ascontiguousarray(array, dtype=np.float16)
            dtype = "float32"
        elif codec == "int8":
            # float64 arithmetic: for tiny (subnormal) peaks the scale underflows in float32
            peak = float(np.max(np.abs(array))) if array.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            stored = np.clip(np.rint(array.astype(np.float64) / scale), -127, 127).astype(np.int8)
            dtype = "float32"
        else:
            stored = np.ascontiguousarray(array)
        return cls(dtype, tuple(int(d) for d in array.shape), codec, _bytes_view(stored), scale)

    @classmethod
    def latent(cls, array: np.ndarray) -> Tensor:
        """Wrap an autoencoder latent (fp16 storage) that the receiver decodes with its model."""
        stored = np.ascontiguousarray(array, dtype=np.float16)
        return cls("float32", tuple(int(d) for d in array.shape), "ae", _bytes_view(stored))

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def storage_dtype(self) -> np.dtype[Any]:
        if self.codec in ("fp16", "ae"):
            return np.dtype(np.float16)
        if self.codec == "int8":
            return np.dtype(np.int8)
        return np.dtype(self.dtype)

    def stored(self) -> np.ndarray:
        """The stored array as a read-only view of the bytes (no copy)."""
        return np.frombuffer(self.data, dtype=self.storage_dtype()).reshape(self.shape)

    def to_numpy(self) -> np.ndarray:
        """The decoded array (float32 for fp16 and int8); raw returns a view without a copy."""
        if self.codec == "ae":
            raise WireError("tensor: an 'ae' latent needs the cut's decoder model to decode")
        stored = self.stored()
        if self.codec == "fp16":
            return stored.astype(np.float32)
        if self.codec == "int8":
            return (stored.astype(np.float64) * self.scale).astype(np.float32)
        return stored

    @staticmethod
    def decode_bytes(tensor: Tensor) -> np.ndarray:
        """Decode through the wire (encode to msgpack and back), as a receiver would see it."""
        from offramp.wire.reader import pack, unpack

        r = unpack(pack("tensor", {"t": tensor.to_wire()}), "tensor", max_bytes=1 << 30)
        return Tensor.from_wire(r.map("t")).to_numpy()

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "codec": self.codec,
                               "data": self.data}
        if self.codec == "int8":
            out["scale"] = self.scale
        return out

    @classmethod
    def from_wire(cls, r: Reader) -> Tensor:
        dtype = r.text("dtype")
        if dtype not in DTYPES:
            raise WireError(f"{r.path}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        codec = r.text("codec")
        if codec not in CODECS:
            raise WireError(f"{r.path}.codec: {codec!r} is not one of {', '.join(CODECS)}")
        shape_raw = r.array("shape")
        if len(shape_raw) > MAX_RANK:
            raise WireError(f"{r.path}.shape: rank {len(shape_raw)} is over {MAX_RANK}")
        shape = tuple(r.item("shape", i).integer("_") for i in range(len(shape_raw)))
        if any(d < 0 for d in shape):
            raise WireError(f"{r.path}.shape: negative dimension in {list(shape)}")
        scale = r.number("scale") if codec == "int8" else 1.0
        if codec == "int8" and not scale > 0:
            raise WireError(f"{r.path}.scale: must be > 0, got {scale}")
        data = r.blob("data")
        tensor = cls(dtype, shape, codec, data, scale)
        expected = math.prod(shape) * tensor.storage_dtype().itemsize
        if expected != len(data):
            raise WireError(
                f"{r.path}: shape {list(shape)} x {tensor.storage_dtype()} needs {expected} bytes, "
                f"got {len(data)}"
            )
        return tensor
