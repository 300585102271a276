"""A frame's size from its JPEG/PNG header, in bounded work, as Pillow would read it.

Pillow walks every chunk or marker segment before a frame's pixels one Python step at a time:
a megabyte of empty ones held the interpreter for a third of a second per frame. These tests
check that :func:`~offramp.model.headers.image_size` agrees with Pillow on real encodings,
refuses such floods in a fixed number of steps, and that Pillow never sees them.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from offramp.model import images
from offramp.model.frames import check_frame
from offramp.model.headers import MAX_SEGMENTS, image_size
from offramp.model.images import decode_image
from offramp.model.inputs import FrameError, InputSpec

pytestmark = pytest.mark.tier("pure")

PHOTOS = sorted(p for p in (Path(skimage.__file__).parent / "data").iterdir()
                if p.suffix in (".png", ".jpg"))


def _encoded(fmt: str, mode: str, **options: object) -> bytes:
    rng = np.random.default_rng(len(mode) + len(options))
    image = Image.fromarray((rng.random((37, 53, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _with_chunks(png: bytes, count: int) -> bytes:
    """``png`` with ``count`` empty private chunks between IHDR and the image data."""
    ihdr_end = 8 + 25
    return png[:ihdr_end] + _chunk(b"zzZz", b"") * count + png[ihdr_end:]


def _with_comments(jpeg: bytes, count: int) -> bytes:
    """``jpeg`` with ``count`` empty comment segments after its start-of-image marker."""
    return jpeg[:2] + b"\xff\xfe\x00\x02" * count + jpeg[2:]


ENCODINGS = {
    "png-rgb": _encoded("PNG", "RGB"),
    "png-gray": _encoded("PNG", "L"),
    "png-rgba": _encoded("PNG", "RGBA"),
    "png-palette": _encoded("PNG", "P"),
    "png-16bit": _encoded("PNG", "I;16"),
    "png-ancillary": _encoded("PNG", "RGB", dpi=(72, 72), icc_profile=b"\0" * 3000),
    "jpeg-baseline": _encoded("JPEG", "RGB"),
    "jpeg-progressive": _encoded("JPEG", "RGB", progressive=True),
    "jpeg-gray": _encoded("JPEG", "L"),
    "jpeg-444": _encoded("JPEG", "RGB", subsampling=0, quality=95),
    "jpeg-exif-icc": _encoded("JPEG", "RGB", exif=Image.Exif().tobytes(),
                              icc_profile=b"\0" * 70_000),  # the profile spans two segments
    "jpeg-cmyk": _encoded("JPEG", "CMYK"),
}
_BASELINE = ENCODINGS["jpeg-baseline"]
_SOF = _BASELINE.find(b"\xff\xc0")
ENCODINGS["jpeg-junk-between-segments"] = _BASELINE[:_SOF] + b"\x00junk" + _BASELINE[_SOF:]


@pytest.mark.parametrize("data", [*ENCODINGS.values(), *(p.read_bytes() for p in PHOTOS)],
                         ids=[*ENCODINGS, *(p.name for p in PHOTOS)])
def test_the_size_is_pillows(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        assert image_size(data) == img.size


@pytest.mark.parametrize(("flood", "message"), [
    (_with_chunks(ENCODINGS["png-rgb"], 90_000), "PNG image with more than 64 chunks"),
    (_with_comments(ENCODINGS["jpeg-baseline"], 250_000), "more than 64 marker segments"),
], ids=["png-chunks", "jpeg-comments"])
def test_a_flood_of_segments_is_refused_before_pillow_reads_it(
        flood: bytes, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """About a megabyte of empty segments before the pixels: one error naming the bound, at
    the header check and at the decode, and Pillow is not called."""
    def no_pillow(*_: object, **__: object) -> None:
        raise AssertionError("Pillow was handed the flood")

    monkeypatch.setattr(images.Image, "open", no_pillow)
    with pytest.raises(FrameError, match=message):
        image_size(flood)
    with pytest.raises(FrameError, match=message):
        check_frame(flood, InputSpec())
    with pytest.raises(FrameError, match=message):
        decode_image(flood)


def test_frames_with_many_segments_short_of_the_bound_still_decode() -> None:
    png = _with_chunks(ENCODINGS["png-rgb"], MAX_SEGMENTS - 2)  # + IHDR, then IDAT
    jpeg = _with_comments(ENCODINGS["jpeg-baseline"], MAX_SEGMENTS - 12)
    for data in (png, jpeg):
        assert decode_image(data).shape == (37, 53, 3)
    with pytest.raises(FrameError, match="more than 64"):
        image_size(_with_chunks(ENCODINGS["png-rgb"], MAX_SEGMENTS))


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"a\0b") + ENCODINGS["png-rgb"][8:],
    b"\xff\xd8" + b"\xff" * 100_000,
    b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 16,
    b"\xff\xd8\xff\xe0\x00\x01",
    b"\xff\xd8" + b"\x00" * 1000,
], ids=["png-ihdr-not-first", "jpeg-all-fill", "jpeg-scan-first", "jpeg-bad-length",
        "jpeg-no-marker"])
def test_broken_headers_are_one_clear_error(data: bytes) -> None:
    with pytest.raises(FrameError, match="not a decodable JPEG or PNG image"):
        image_size(data)


@pytest.mark.parametrize("name", ["png-ancillary", "jpeg-exif-icc"])
def test_cut_or_mangled_headers_give_a_size_or_a_frame_error_never_another(name: str) -> None:
    """Every prefix of a real header, and a thousand random byte changes to it."""
    data = ENCODINGS[name]
    header = data[:2048]
    for end in range(len(header)):
        try:
            size = image_size(data[:end])
        except FrameError:
            continue
        assert size == (53, 37)  # a prefix that reaches the pixels has the whole header
    rng = np.random.default_rng(7)
    for _ in range(1000):
        mangled = bytearray(data)
        for at in rng.integers(2, len(header), 3):
            mangled[at] = int(rng.integers(0, 256))
        try:
            width, height = image_size(bytes(mangled))
        except FrameError:
            continue
        assert 0 <= width < 1 << 32 and 0 <= height < 1 << 32
