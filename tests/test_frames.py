"""Ingest decoding without I/O: what the admission-controller makes of each payload."""

from __future__ import annotations

import io
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from admission_controller import frames
from admission_controller.frames import Frame, decode_frames
from offramp.local.client import envelope, png_bytes
from offramp.model import frames as camera
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
    decoded in the same hand-off (it would otherwise end the ingest task, or the worker's
    intake), at the admission-controller and at the first worker alike."""
    real = camera.decode_image
    poison = png_bytes(_image(3))

    def decode(data: bytes, **kwargs: Any) -> np.ndarray:
        if data == poison:
            raise RuntimeError("decoder bug")
        return real(data, **kwargs)

    monkeypatch.setattr(camera, "decode_image", decode)
    out = decode_frames([png_bytes(_image(4)), poison, png_bytes(_image(5))], SPEC,
                        max_bytes=LIMIT)
    assert [type(o) for o in out] == [Frame, FrameError, Frame]
    assert "RuntimeError: decoder bug" in str(out[1])
    at_worker = camera.decode_frames([png_bytes(_image(4)), poison], SPEC)
    assert isinstance(at_worker[0], np.ndarray) and isinstance(at_worker[1], FrameError)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    return camera.npy_bytes(arr)


def test_the_first_hop_forwards_what_the_camera_sent_and_the_worker_makes_the_same_input(
        ) -> None:
    """Admission checks a frame from its header and forwards its bytes unchanged; the worker's
    decode of them equals the input the admission-controller would have decoded itself."""
    big = (np.random.default_rng(7).random((720, 1280, 3)) * 255).astype(np.uint8)
    tensor = np.random.default_rng(8).random(SPEC.shape).astype(np.float32)
    for payload in (png_bytes(big), _jpeg(big), _npy(big), envelope("t", tensor=tensor),
                    envelope("p", image=_image(9))):
        arrival = frames.read_frame(payload, max_bytes=1 << 24)
        sent = frames.to_forward(arrival, SPEC)
        if arrival.kind != "tensor":
            assert sent is arrival.body  # the camera's bytes, not a copy of them
        np.testing.assert_array_equal(camera.decode_frame(sent, SPEC),
                                      frames.to_input(arrival, SPEC))


@pytest.mark.parametrize(("payload", "message"), [
    (png_bytes(np.zeros((200, 300, 3), np.uint8)), "over the budget of 50000 pixels"),
    (_npy(np.zeros((200, 300, 3), np.uint8)), "over the budget of 50000 pixels"),
    (_npy(np.zeros((3, 8, 8), np.float32)), "does not match the model input"),
    (_npy(np.zeros((3, 32, 32), np.int64)), "neither an RGB uint8 image nor a float tensor"),
    (b"\x93NUMPY\x01\x00garbage", "not a readable .npy array"),
    (b"\x89PNG\r\n\x1a\n-truncated-", "not a decodable JPEG or PNG"),
    (b"GIF89a", "unrecognised frame"),
])
def test_a_header_that_will_not_decode_is_refused_before_any_pixel_is(payload: bytes,
                                                                         message: str) -> None:
    with pytest.raises(FrameError, match=message):
        camera.check_frame(payload, SPEC, max_pixels=50_000)


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"frame_id": "f1", "image": "..."}', "envelope \\(docs/wire.md\\); this looks like JSON"),
    (b"hello camera", "this looks like text \\('hello camera'\\)"),
    (b"GIF89a\x01\x00\x01\x00\x80\x00", "it starts with bytes 47 49 46 38 39 61 01 00"),
    (msgpack.packb({"v": 1, "k": "frame"}), "envelope that does not follow docs/wire.md: "),
])
def test_a_payload_that_is_no_frame_is_told_what_it_looks_like(payload: bytes,
                                                                message: str) -> None:
    """Not msgpack's own words ('ExtraData: unpack(b) received extra data'), which told a
    user who sent JSON nothing."""
    with pytest.raises(FrameError, match=message) as caught:
        frames.read_frame(payload, max_bytes=1 << 20)
    assert "ExtraData" not in str(caught.value) and "unpack" not in str(caught.value)


def test_a_broken_envelope_is_answered_under_the_frame_id_it_names() -> None:
    bad = msgpack.packb({"v": 1, "k": "frame", "frame": "cam-7/000123", "ts": "noon"})
    with pytest.raises(frames.BadEnvelope) as caught:
        frames.read_frame(bad, max_bytes=1 << 20)
    assert caught.value.frame_id == "cam-7/000123" and "ts" in str(caught.value)
    for nameless in ({"v": 1, "k": "frame", "ts": 1.0}, {"v": 1, "frame": 7},
                     {"v": 1, "frame": "x" * 300}, {"v": 1, "frame": "line\nbreak"}):
        with pytest.raises(frames.BadEnvelope) as caught:
            frames.read_frame(msgpack.packb(nameless), max_bytes=1 << 20)
        assert caught.value.frame_id is None
