"""Ingest decoding without I/O: what the admission-controller makes of each payload."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from admission_controller import frames
from admission_controller.frames import Frame, decode_frames
from offramp.local.client import envelope, png_bytes
from offramp.model.images import decode_image
from offramp.model.inputs import FrameError, InputSpec

SPEC = InputSpec()
LIMIT = 1 << 20


def _image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)


def _broken_png() -> bytes:
    """A PNG whose data chunk claims the wrong length: the decoder then reads a chunk header
    from the middle of the pixels, and Pillow raises SyntaxError, not OSError."""
    data = bytearray(png_bytes(_image()))
    assert data[37:41] == b"IDAT"
    data[36] ^= 0x2A
    return bytes(data)


def test_a_png_with_a_broken_chunk_is_a_frame_error() -> None:
    with pytest.raises(FrameError, match="not a decodable JPEG or PNG"):
        decode_image(_broken_png())


def test_a_batch_keeps_each_frame_and_each_error_in_order() -> None:
    payloads = [png_bytes(_image(1)), b"hello", _broken_png(), envelope("f-7", image=_image(2))]
    out = decode_frames(payloads, SPEC, max_bytes=LIMIT)
    assert [type(o) for o in out] == [Frame, FrameError, FrameError, Frame]
    assert "unrecognised frame" in str(out[1])
    good = out[3]
    assert isinstance(good, Frame) and good.frame_id == "f-7" and good.x.shape == SPEC.shape


def test_a_decoder_failing_unexpectedly_costs_only_that_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder bug on hostile bytes answers that frame with an error and spares the others
    decoded in the same hand-off (it would otherwise end the ingest task)."""
    real = frames.decode_image
    poison = png_bytes(_image(3))

    def decode(data: bytes, **kwargs: Any) -> np.ndarray:
        if data == poison:
            raise RuntimeError("decoder bug")
        return real(data, **kwargs)

    monkeypatch.setattr(frames, "decode_image", decode)
    out = decode_frames([png_bytes(_image(4)), poison, png_bytes(_image(5))], SPEC,
                        max_bytes=LIMIT)
    assert [type(o) for o in out] == [Frame, FrameError, Frame]
    assert "RuntimeError: decoder bug" in str(out[1])
