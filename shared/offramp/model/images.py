"""Turning JPEG/PNG frames into the model's input, exactly as training saw it (Pillow).

A bundle's manifest holds an :class:`~offramp.model.inputs.InputSpec`; the admission-controller
applies it to every decoded image, and training applies the same functions to its uint8 images.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from offramp.model.headers import image_size
from offramp.model.inputs import FrameError, InputSpec, normalise

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
    decoder and its canvas alive until the next garbage collection. The header is walked
    first in bounded work (:func:`~offramp.model.headers.image_size`), so Pillow never reads
    one of thousands of segments."""
    if problem := header_problem(data, max_pixels):
        raise FrameError(problem)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            # Pillow's own reading of the size, checked too: the budget holds even where the
            # walk above and Pillow would ever disagree on a malformed header
            problem = size_problem(*img.size, max_pixels)
            if not problem:
                if reduce_to is not None and img.format == "JPEG":
                    img.draft("RGB", (2 * reduce_to[0], 2 * reduce_to[1]))
                img.load()
                return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except UNREADABLE as exc:
        problem = _unreadable(exc, max_pixels)
    raise FrameError(problem)


# What Pillow raises on a file it cannot read: SyntaxError from some plugins for a broken
# file, DecompressionBombError for a header past its own limit.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError,
              Image.DecompressionBombError)


def _unreadable(exc: BaseException, budget: int) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return (f"image of more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels is over the "
                f"budget of {budget} pixels (OFFRAMP_MAX_PIXELS)")
    return f"not a decodable JPEG or PNG image ({exc})"


def size_problem(width: int, height: int, budget: int) -> str:
    """What is wrong with an image of ``width`` x ``height`` pixels ('': nothing)."""
    if width * height > budget:
        return (f"image of {width}x{height} pixels is over the budget of {budget} pixels "
                "(OFFRAMP_MAX_PIXELS)")
    if width == 0 or height == 0:
        return f"empty image ({width}x{height})"
    return ""


def header_problem(data: bytes, budget: int) -> str:
    """What is wrong with JPEG/PNG bytes, read from their header alone ('': nothing), in
    bounded work (:mod:`offramp.model.headers`); their pixels are the decoder's to judge."""
    try:
        return size_problem(*image_size(data), budget)
    except FrameError as exc:
        return str(exc)


def refuse_by_budget_only() -> None:
    """Turn off Pillow's decompression-bomb warning in this process. offramp refuses an image
    over its pixel budget from the header, in its own words (OFFRAMP_MAX_PIXELS, by default
    far below Pillow's limit); the warning only repeated that refusal as a raw line in a JSON
    log. Called once by the services that decode frames."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def resize_uint8(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images with bilinear filtering, each written straight into
    the result (no list of resized copies beside it)."""
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, *images.shape[3:]), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BILINEAR))
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
