"""Images that claim to be huge: refused from their header, and they leave no memory behind.

A PNG of about 80 bytes can claim 9000x9000 pixels; decoding it allocated a canvas that the
admission-controller then kept (30 MB each). These tests build such frames here and send them
to the real admission-controller.
"""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from test_system import FAST, _frames, _run

from admission_controller.frames import decode_frames
from offramp.local.client import envelope
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.model.frames import check_frame
from offramp.model.images import decode_image, refuse_by_budget_only
from offramp.model.inputs import FrameError, InputSpec

pytestmark = pytest.mark.tier("inproc")

SPEC = InputSpec()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_claiming(width: int, height: int, *, color: int = 6, whole: bool = False) -> bytes:
    """A PNG header for ``width`` x ``height`` (colour type 6: RGBA) with almost no data, or
    ``whole``: every row there, all zero, which zlib squeezes to about a thousandth."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    if whole:
        rows = (b"\x00" * (1 + width * channels)) * height
        data = zlib.compress(rows, 9)
    else:
        data = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)
            + (_chunk(b"IEND", b"") if whole else b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is rewritten to claim ``width`` x ``height``, cut
    a few bytes into its scan."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 40)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[:data.find(b"\xff\xda") + 24])


@pytest.mark.parametrize("payload", [png_claiming(9000, 9000), png_claiming(9000, 9000, color=0),
                                     jpeg_claiming(9000, 9000)],
                         ids=["png-rgba", "png-gray", "jpeg"])
def test_an_image_over_the_pixel_budget_is_refused_from_its_header(payload: bytes) -> None:
    with pytest.raises(FrameError, match="9000x9000 pixels is over the budget") as info:
        decode_image(payload, max_pixels=3840 * 2160)
    assert info.value.__context__ is None  # no decoder or canvas kept alive by the error


@pytest.mark.parametrize("side", [10_000, 20_000])  # past Pillow's warning; past its error
def test_a_header_past_pillows_own_limits_is_refused_in_offramps_words(side: int) -> None:
    """Not Pillow's 'decompression bomb' wording, and no raw warning line in a JSON log."""
    payload = png_claiming(side, side)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        refuse_by_budget_only()
        for check in (lambda: decode_image(payload, max_pixels=3840 * 2160),
                      lambda: check_frame(payload, InputSpec(3, 32, 32), 3840 * 2160)):
            with pytest.raises(FrameError, match="is over the budget of 8294400 pixels "
                               "\\(OFFRAMP_MAX_PIXELS\\)") as info:
                check()
            assert "decompression" not in str(info.value).lower()
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_budget_defaults_to_4k_and_grows_with_large_model_inputs() -> None:
    out = decode_frames([png_claiming(4000, 2200)], SPEC, max_bytes=1 << 20)
    assert isinstance(out[0], FrameError) and "budget of 8294400" in str(out[0])
    big = InputSpec(height=2048, width=2048)
    out = decode_frames([png_claiming(4000, 2200)], big, max_bytes=1 << 20)
    assert isinstance(out[0], FrameError) and "truncated" in str(out[0])  # decoded, then broken


def test_a_truncated_image_inside_the_budget_is_an_error_with_no_context() -> None:
    out = decode_frames([png_claiming(1000, 1000)], SPEC, max_bytes=1 << 20)
    assert isinstance(out[0], FrameError) and "not a decodable" in str(out[0])
    assert out[0].__context__ is None


def test_a_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((1024, 1024, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    image = decode_image(buf.getvalue(), reduce_to=(32, 32))
    assert image.shape == (128, 128, 3)  # 1/8 scale: still at least twice the input


def test_empty_images_are_errors() -> None:
    payloads = []
    for shape in ((0, 0, 3), (0, 32, 3), (32, 0, 3)):
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.uint8))
        payloads.append(buf.getvalue())
    out = decode_frames(payloads, SPEC, max_bytes=1 << 20)
    assert all(isinstance(o, FrameError) and "empty image" in str(o) for o in out), out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_thousand_decoding_bombs_leave_the_admission_controller_as_it_was(
        tiny_bundle: Bundle, prefix: str) -> None:
    """1,000 hostile images (PNG and JPEG headers over the budget, truncated and whole, and
    truncated ones inside it that are decoded as far as they go) among real frames: each
    bomb gets one error result, every real frame its answer, and the memory of the
    admission-controller and of the workers ends within 50 MB of where it was after the same
    real frames alone."""
    bombs = ([png_claiming(9000, 9000)] * 400 + [png_claiming(9000, 9000, color=4)] * 200
             + [jpeg_claiming(9000, 9000)] * 200 + [png_claiming(2800, 2800)] * 180
             + [png_claiming(9000, 9000, color=0, whole=True)] * 20)
    _, warmup = _frames(100)
    images, _ = _frames(100, offset=100)
    real = [envelope(f"real-{i}", image=im) for i, im in enumerate(images)]
    mixed: list[bytes] = []
    for i, bomb in enumerate(bombs):
        mixed.append(bomb)
        if i % 10 == 0:
            mixed.append(real[i // 10])
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=FAST) as system:
        # the bombs within the budget pass the admission-controller's header check and are
        # decoded, as far as they go, by the first worker: both stay as they were
        members = [system.member(n) for n in ("admission-1", "worker-1", "worker-2")]
        assert all(m.proc is not None for m in members)
        first = asyncio.run(_run(system, warmup, rate=200))
        before = [_rss_mb(m.proc.pid) for m in members]  # type: ignore[union-attr]
        results = asyncio.run(_run(system, mixed, rate=400, timeout=120))
        after = [_rss_mb(m.proc.pid) for m in members]  # type: ignore[union-attr]
        codes = system.stop()
    assert Counter(r.status for r in first) == {"ok": 100}
    status = Counter(r.status for r in results)
    assert status == {"ok": 100, "error": len(bombs)}, status
    errors = Counter("over the budget" in (r.error or "") for r in results if r.status == "error")
    assert errors[True] == 820, errors  # the 180 inside the budget fail while decoding
    assert all(a - b < 50 for a, b in zip(after, before, strict=True)), (before, after)
    ok = [r.latency_ms["total"] for r in results if r.status == "ok"]
    assert max(ok) < 3000, sorted(ok)[-5:]  # real frames did not wait behind the bombs
    assert all(code == 0 for code in codes.values()), str(codes)
