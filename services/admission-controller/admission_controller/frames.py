"""Reading an ingest payload: JPEG, PNG, .npy, or a msgpack frame envelope.

In two steps, so that admission is decided before any pixel is decoded: :func:`read_frame`
(cheap: the kind, and an envelope's frame id, deadline and label), then, off the event loop,
either :func:`to_forward` (the bytes the first worker decodes, checked from their header: the
default first hop) or :func:`to_input` (decoded and preprocessed here, for a first hop that
carries the model input). Anything else raises :class:`~offramp.model.inputs.FrameError` with
a message saying what was expected; the admission-controller answers it with an ``error``
result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from offramp.errors import WireError
from offramp.model.frames import array_input, check_frame, kind_of, npy_bytes
from offramp.model.frames import decode_frame as decode_bytes
from offramp.model.inputs import FrameError, InputSpec
from offramp.wire import FrameEnvelope, Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Frame:
    x: np.ndarray  # the model input (C, H, W) float32
    frame_id: str | None = None
    deadline: float | None = None
    label: int | None = None


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


class BadEnvelope(FrameError):
    """An envelope that does not follow docs/wire.md, with the frame id it names (None when
    it names none that can be read), so that its error is answered under that id."""

    def __init__(self, message: str, frame_id: str | None) -> None:
        super().__init__(message)
        self.frame_id = frame_id


MSGPACK_MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # what an envelope's first byte is


def _looks_like(data: bytes) -> str:
    """What a payload that is no frame seems to be, for its error."""
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text.lstrip()[:1] in ("{", "["):
        return "this looks like JSON"
    if text and text.isprintable():
        return f"this looks like text ({text[:24]!r})"
    return f"it starts with bytes {head[:8].hex(' ')}"


def read_frame(data: bytes, *, max_bytes: int) -> Arrival:
    """Read a payload as far as admission needs, cheaply (no pixel decoded): FrameError if it
    is too large, empty, or not one of the accepted kinds."""
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes is over the limit of {max_bytes}")
    if not data:
        raise FrameError("empty frame")
    kind = kind_of(data)
    if kind is not None:
        return Arrival("image" if kind == "image" else "npy", data)
    if data[0] not in MSGPACK_MAPS:
        raise FrameError("unrecognised frame: expected JPEG, PNG, .npy or a msgpack frame "
                         f"envelope (docs/wire.md); {_looks_like(data)}")
    try:
        env = FrameEnvelope.decode(data, max_bytes=max_bytes)
    except WireError as exc:
        raise BadEnvelope(f"a msgpack frame envelope that does not follow docs/wire.md: {exc}",
                          FrameEnvelope.claimed_id(data)) from None
    if env.image is not None:
        return Arrival("image", env.image, env.frame_id, env.deadline, env.label)
    assert env.tensor is not None
    return Arrival("tensor", env.tensor, env.frame_id, env.deadline, env.label)


def _array(tensor: Tensor) -> np.ndarray:
    try:
        return tensor.to_numpy()
    except WireError as exc:
        raise FrameError(str(exc)) from None


def to_input(arrival: Arrival, spec: InputSpec, *, max_pixels: int = 0) -> np.ndarray:
    """The model input of a frame read by :func:`read_frame` (the costly part: call it off
    the event loop). Images over ``max_pixels`` (0: :func:`~offramp.model.images.
    pixel_budget`) are refused from their header."""
    body = arrival.body
    if isinstance(body, Tensor):
        return array_input(_array(body), spec)
    return decode_bytes(body, spec, max_pixels)


def to_forward(arrival: Arrival, spec: InputSpec, *, max_pixels: int = 0) -> bytes:
    """The bytes the first worker decodes: the image or ``.npy`` as it came (an envelope's
    tensor as ``.npy``), once its header says it will decode within the pixel budget."""
    body = arrival.body
    data = npy_bytes(_array(body)) if isinstance(body, Tensor) else body
    check_frame(data, spec, max_pixels)
    return data


def _each(arrivals: list[Arrival], fn: Callable[[Arrival], T],
          stop: threading.Event | None) -> list[T | FrameError]:
    """``fn`` of each arrival, or the error that says why not. A decoder failing in a way it
    does not name is that frame's error too, not its batch's. Once ``stop`` is set, the frames
    not yet begun are left out (a stopping service answers them): a batch of large images
    would otherwise hold the process's exit for seconds."""
    out: list[T | FrameError] = []
    for arrival in arrivals:
        if stop is not None and stop.is_set():
            break
        try:
            out.append(fn(arrival))
        except FrameError as exc:
            out.append(exc)
        except Exception as exc:  # a decoder's unnamed failure on hostile bytes
            out.append(FrameError(f"undecodable frame ({type(exc).__name__}: {exc})"))
    return out


def to_inputs(arrivals: list[Arrival], spec: InputSpec, *, max_pixels: int = 0,
              stop: threading.Event | None = None) -> list[np.ndarray | FrameError]:
    """:func:`to_input` for each arrival (see :func:`_each`)."""
    return _each(arrivals, lambda a: to_input(a, spec, max_pixels=max_pixels), stop)


def to_forwards(arrivals: list[Arrival], spec: InputSpec, *, max_pixels: int = 0,
                stop: threading.Event | None = None) -> list[bytes | FrameError]:
    """:func:`to_forward` for each arrival (see :func:`_each`)."""
    return _each(arrivals, lambda a: to_forward(a, spec, max_pixels=max_pixels), stop)


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
