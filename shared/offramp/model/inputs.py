"""A model's input: its shape and normalisation (:class:`InputSpec`, from a bundle's manifest),
and the checks and arithmetic that turn pixels or a given tensor into it. numpy only, so the
services that never see an image (arbiter, scheduler) need no image library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from offramp.errors import OfframpError


class FrameError(OfframpError):
    """A frame that cannot become a model input: undecodable, wrong shape, wrong type."""


@dataclass(frozen=True)
class InputSpec:
    """Input of segment 1: ``channels x height x width`` float32, from RGB uint8 images as
    ``(pixel / 255 - mean) / std`` per channel."""

    channels: int = 3
    height: int = 32
    width: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @cached_property
    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, offset)``, float32 of shape (C, 1, 1): input = pixel * scale + offset."""
        std = np.asarray(self.std, np.float64)[:, None, None]
        mean = np.asarray(self.mean, np.float64)[:, None, None]
        return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]),
                   tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def normalise(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 at the spec's size to (N, C, H, W) float32."""
    scale, offset = spec.affine
    x = images.transpose(0, 3, 1, 2)
    if scale.shape[0] not in (1, x.shape[1]):  # per-channel constants, or one for all
        raise FrameError(f"the input spec has {scale.shape[0]} channel constants for images "
                         f"of {x.shape[1]} channels")
    out = np.empty(x.shape, np.float32)
    np.multiply(x, scale, out=out)  # one pass from uint8 to float32, then one in place
    out += offset
    return out


def check_tensor(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A tensor given directly (``.npy`` or envelope) must already be the model input."""
    if x.shape != spec.shape:
        raise FrameError(f"tensor shape {list(x.shape)} does not match the model input "
                         f"{list(spec.shape)}")
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise FrameError(f"tensor dtype {x.dtype} is not a float type")
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise FrameError("tensor has NaN or infinite values")
    return arr
