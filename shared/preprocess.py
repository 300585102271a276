"""Turning a frame into the model's input tensor, exactly as training saw it (numpy + Pillow).

A bundle's manifest holds an :class:`InputSpec`; the admission-controller applies it to every
decoded image, and training applies the same function to its uint8 images.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

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


FORMATS = ("JPEG", "PNG")  # what ingest accepts; Pillow tries no other decoder
UHD_PIXELS = 3840 * 2160


def pixel_budget(spec: InputSpec, configured: int = 0) -> int:
    """The largest image accepted, in pixels: ``configured``, or when 0 the larger of 4K UHD
    and four times the model input (well under Pillow's own decompression-bomb limit)."""
    return configured or max(UHD_PIXELS, 4 * spec.height * spec.width)


def decode_image(data: bytes, *, max_pixels: int = UHD_PIXELS,
                 reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG/PNG bytes to an RGB uint8 array (H, W, 3); FrameError if it is not an image.

    The size comes from the header, before any pixel is decoded: an image over ``max_pixels``
    is refused there, so a few bytes that claim 9000x9000 cost nothing. A JPEG is decoded at a
    reduced scale (DCT scaling) when ``reduce_to`` (width, height) is much smaller than it.
    The error is raised outside the handler: an exception's context would keep Pillow's
    decoder and its canvas alive until the next garbage collection."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                problem = (f"image of {width}x{height} pixels is over the budget of "
                           f"{max_pixels} pixels (OFFRAMP_ADMISSION_MAX_PIXELS)")
            elif width == 0 or height == 0:
                problem = f"empty image ({width}x{height})"
            else:
                if reduce_to is not None and img.format == "JPEG":
                    img.draft("RGB", (2 * reduce_to[0], 2 * reduce_to[1]))
                img.load()
                return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, EOFError, Image.DecompressionBombError,
            SyntaxError) as exc:  # Pillow's plugins raise SyntaxError for a broken file
        problem = f"not a decodable JPEG or PNG image ({exc})"
    raise FrameError(problem)


def resize_uint8(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images with bilinear filtering."""
    if images.shape[1:3] == (height, width):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BILINEAR))
                     for im in images])


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


def image_to_input(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One RGB uint8 image of any size to the (C, H, W) float32 input."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise FrameError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if image.size == 0:
        raise FrameError(f"empty image {list(image.shape)}")
    resized = resize_uint8(image[None], spec.height, spec.width)
    out: np.ndarray = normalise(resized, spec)[0]
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
