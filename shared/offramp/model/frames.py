"""A camera's frame bytes (JPEG, PNG or ``.npy``) and the model input they make.

Two steps, on two nodes: :func:`check_frame` reads only what a frame's header says (its kind,
its dimensions against the pixel budget, an array's shape and dtype) and decodes no pixel; the
admission-controller calls it on every admitted frame and forwards the bytes as they came.
:func:`decode_frames` decodes and preprocesses them, on the first worker's inference thread,
each failure that frame's own :class:`FrameError`.
"""

from __future__ import annotations

import io
import threading

import numpy as np

from offramp.model.images import (
    decode_image,
    header_problem,
    image_to_input,
    pixel_budget,
    size_problem,
)
from offramp.model.inputs import FrameError, InputSpec, check_tensor

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"
NPY = b"\x93NUMPY"


def kind_of(data: bytes) -> str | None:
    """``image``, ``npy`` or None, from the first bytes."""
    if data.startswith(PNG) or data.startswith(JPEG):
        return "image"
    if data.startswith(NPY):
        return "npy"
    return None


def array_input(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """An RGB uint8 image of any size, or a float tensor already of the model input's shape."""
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return image_to_input(arr, spec)
    return check_tensor(arr, spec)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise FrameError(f"not a readable .npy array ({exc})") from None
    return tuple(shape), dtype


def check_frame(data: bytes, spec: InputSpec, max_pixels: int = 0) -> None:
    """FrameError unless ``data``'s header describes a frame :func:`decode_frame` would take:
    a JPEG or PNG within the pixel budget (``max_pixels``, 0: :func:`pixel_budget`), an RGB
    uint8 ``.npy`` image within it, or a float ``.npy`` tensor of the model input's shape.
    No pixel is decoded."""
    budget = pixel_budget(spec, max_pixels)
    kind = kind_of(data)
    if kind == "image":
        if problem := header_problem(data, budget):
            raise FrameError(problem)
        return
    if kind == "npy":
        shape, dtype = _npy_header(data)
        if dtype == np.uint8 and len(shape) == 3 and shape[2] == 3:
            if problem := size_problem(shape[1], shape[0], budget):
                raise FrameError(problem)
            return
        if dtype.kind != "f":
            raise FrameError(f"array {dtype} {list(shape)} is neither an RGB uint8 image nor a "
                             "float tensor")
        if shape != spec.shape:
            raise FrameError(f"tensor shape {list(shape)} does not match the model input "
                             f"{list(spec.shape)}")
        return
    raise FrameError("unrecognised frame: expected JPEG, PNG or .npy")


def decode_frame(data: bytes, spec: InputSpec, max_pixels: int = 0) -> np.ndarray:
    """The model input (C, H, W) float32 of one frame's bytes, or FrameError saying why not."""
    kind = kind_of(data)
    if kind == "image":
        image = decode_image(data, max_pixels=pixel_budget(spec, max_pixels),
                             reduce_to=(spec.width, spec.height))
        return image_to_input(image, spec)
    if kind == "npy":
        shape, dtype = _npy_header(data)  # the size is checked before the array is read
        pixels = bool(dtype == np.uint8) and len(shape) == 3 and shape[2] == 3
        if pixels and (problem := size_problem(shape[1], shape[0],
                                               pixel_budget(spec, max_pixels))):
            raise FrameError(problem)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FrameError(f"not a readable .npy array ({exc})") from None
        return array_input(arr, spec)
    raise FrameError("unrecognised frame: expected JPEG, PNG or .npy")


def decode_frames(frames: list[bytes], spec: InputSpec, max_pixels: int = 0,
                  stop: threading.Event | None = None) -> list[np.ndarray | FrameError]:
    """:func:`decode_frame` for each frame: the input, or the error that says why not. A
    decoder failing in a way it does not name is that frame's error too, not its batch's.
    Once ``stop`` is set, the frames not yet begun are left out."""
    out: list[np.ndarray | FrameError] = []
    for data in frames:
        if stop is not None and stop.is_set():
            break
        try:
            out.append(decode_frame(data, spec, max_pixels))
        except FrameError as exc:
            out.append(exc)
        except Exception as exc:  # a decoder's unnamed failure on hostile bytes
            out.append(FrameError(f"undecodable frame ({type(exc).__name__}: {exc})"))
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as ``.npy`` bytes (how a tensor given in an envelope travels to the worker)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
