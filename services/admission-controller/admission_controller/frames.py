"""Turning an ingest payload into a model input: JPEG, PNG, .npy, or a msgpack frame envelope.

In two steps, so that admission is decided before any pixel is decoded: :func:`read_frame`
(cheap: the kind, and an envelope's frame id, deadline and label) and :func:`to_input` (the
decode and preprocessing, off the event loop). Anything else raises
:class:`~offramp.model.inputs.FrameError` with a message saying what was expected; the
admission-controller answers it with an ``error`` result.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

from offramp.errors import WireError
from offramp.model.images import decode_image, image_to_input, pixel_budget
from offramp.model.inputs import FrameError, InputSpec, check_tensor
from offramp.wire import FrameEnvelope, Tensor

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"
NPY = b"\x93NUMPY"


@dataclass(frozen=True)
class Frame:
    x: np.ndarray  # the model input (C, H, W) float32
    frame_id: str | None = None
    deadline: float | None = None
    label: int | None = None


def _from_array(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return image_to_input(arr, spec)
    return check_tensor(arr, spec)


def _npy(data: bytes, spec: InputSpec) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FrameError(f"not a readable .npy array ({exc})") from None
    return _from_array(arr, spec)


def _image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    image = decode_image(data, max_pixels=max_pixels, reduce_to=(spec.width, spec.height))
    return image_to_input(image, spec)


@dataclass(frozen=True)
class Arrival:
    """What an ingest payload says before any pixel is decoded: its frame id, deadline and
    label if it is an envelope, and what :func:`to_input` will decode (image bytes, ``.npy``
    bytes, or the envelope's tensor)."""

    kind: Literal["image", "npy", "tensor"]
    body: bytes | Tensor
    frame_id: str | None = None
    deadline: float | None = None
    label: int | None = None


def read_frame(data: bytes, *, max_bytes: int) -> Arrival:
    """Read a payload as far as admission needs, cheaply (no pixel decoded): FrameError if it
    is too large, empty, or not one of the accepted kinds."""
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes is over the limit of {max_bytes}")
    if not data:
        raise FrameError("empty frame")
    if data.startswith(PNG) or data.startswith(JPEG):
        return Arrival("image", data)
    if data.startswith(NPY):
        return Arrival("npy", data)
    try:
        env = FrameEnvelope.decode(data, max_bytes=max_bytes)
    except WireError as exc:
        raise FrameError("unrecognised frame: expected JPEG, PNG, .npy or a msgpack frame "
                         f"envelope ({exc})") from None
    if env.image is not None:
        return Arrival("image", env.image, env.frame_id, env.deadline, env.label)
    assert env.tensor is not None
    return Arrival("tensor", env.tensor, env.frame_id, env.deadline, env.label)


def to_input(arrival: Arrival, spec: InputSpec, *, max_pixels: int = 0) -> np.ndarray:
    """The model input of a frame read by :func:`read_frame` (the costly part: call it off
    the event loop). Images over ``max_pixels`` (0: :func:`~offramp.model.images.
    pixel_budget`) are refused from their header."""
    body = arrival.body
    if isinstance(body, Tensor):
        try:
            return _from_array(body.to_numpy(), spec)
        except WireError as exc:
            raise FrameError(str(exc)) from None
    if arrival.kind == "npy":
        return _npy(body, spec)
    return _image(body, spec, pixel_budget(spec, max_pixels))


def to_inputs(arrivals: list[Arrival], spec: InputSpec, *, max_pixels: int = 0,
              stop: threading.Event | None = None) -> list[np.ndarray | FrameError]:
    """:func:`to_input` for each arrival: the input, or the error that says why not. A
    decoder failing in a way it does not name is that frame's error too, not its batch's.
    Once ``stop`` is set, the frames not yet begun are left out (a stopping service answers
    them): a batch of large images would otherwise hold the process's exit for seconds."""
    out: list[np.ndarray | FrameError] = []
    for arrival in arrivals:
        if stop is not None and stop.is_set():
            break
        try:
            out.append(to_input(arrival, spec, max_pixels=max_pixels))
        except FrameError as exc:
            out.append(exc)
        except Exception as exc:  # a decoder's unnamed failure on hostile bytes
            out.append(FrameError(f"undecodable frame ({type(exc).__name__}: {exc})"))
    return out


def decode_frame(data: bytes, spec: InputSpec, *, max_bytes: int, max_pixels: int = 0) -> Frame:
    """The model input for one ingest payload, or FrameError saying why not."""
    arrival = read_frame(data, max_bytes=max_bytes)
    return Frame(to_input(arrival, spec, max_pixels=max_pixels), arrival.frame_id,
                 arrival.deadline, arrival.label)


def decode_frames(payloads: list[bytes], spec: InputSpec, *, max_bytes: int, max_pixels: int = 0,
                  stop: threading.Event | None = None) -> list[Frame | FrameError]:
    """:func:`decode_frame` for each payload: the frame, or the error that says why not (a
    decoder's unnamed failure included), in order; the frames not begun once ``stop`` is set
    are left out."""
    out: list[Frame | FrameError] = []
    for data in payloads:
        if stop is not None and stop.is_set():
            break
        try:
            out.append(decode_frame(data, spec, max_bytes=max_bytes, max_pixels=max_pixels))
        except FrameError as exc:
            out.append(exc)
        except Exception as exc:  # a decoder's unnamed failure on hostile bytes
            out.append(FrameError(f"undecodable frame ({type(exc).__name__}: {exc})"))
    return out
