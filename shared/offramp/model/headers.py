"""The size of a JPEG or PNG frame from its header, in bounded work.

Pillow reads a PNG's chunks up to its first IDAT, and a JPEG's marker segments up to its start
of scan, one Python step each, before it knows the image's size. A frame of a megabyte made of
empty chunks or comment segments kept a process's interpreter (and so its event loop) for a
third of a second at each reading: at the admission-controller's header check, and again at
the worker's decode. :func:`image_size` walks the same structure without decoding anything
and gives up after ``MAX_SEGMENTS``; real frames have a handful (a camera's JPEG: APP0/APP1,
two DQT, SOF, four DHT; a PNG: IHDR and a few ancillary chunks). A frame it passes is handed to
Pillow, which therefore never walks more than that.
"""

from __future__ import annotations

import re
import struct

from offramp.model.inputs import FrameError

MAX_SEGMENTS = 64  # chunks (PNG) or marker segments (JPEG) before the image data
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_IHDR = struct.Struct(">II")
# start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic)
_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                  0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF])
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
_SOS, _SOI, _EOI = 0xDA, 0xD8, 0xD9
_NOT_FILL = re.compile(rb"[^\xff]")


def _broken(what: str) -> FrameError:
    return FrameError(f"not a decodable JPEG or PNG image ({what})")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of JPEG or PNG bytes, read from their header in at most
    MAX_SEGMENTS steps; FrameError saying what is wrong otherwise."""
    if data.startswith(PNG_SIGNATURE):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    raise _broken("neither signature")


def _png_size(data: bytes) -> tuple[int, int]:
    pos, size = len(PNG_SIGNATURE), None
    for _ in range(MAX_SEGMENTS):
        if pos + 8 > len(data):
            break
        (length,) = _U32.unpack_from(data, pos)
        kind = data[pos + 4:pos + 8]
        if size is None:
            if kind != b"IHDR" or length < 8 or pos + 16 > len(data):
                raise _broken("a PNG whose first chunk is not IHDR")
            size = _IHDR.unpack_from(data, pos + 8)
        elif kind == b"IDAT":
            return size
        pos += 12 + length
    else:
        raise FrameError(f"PNG image with more than {MAX_SEGMENTS} chunks before its image "
                         "data (refused unread)")
    raise _broken("a PNG that ends before its image data")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos, size = 2, None
    for _ in range(MAX_SEGMENTS):
        # bytes other than 0xFF between segments are skipped, as Pillow does, and fill bytes
        # (0xFF) may precede a marker: both found in C, whatever their length
        start = data.find(b"\xff", pos)
        found = _NOT_FILL.search(data, start) if start >= 0 else None
        if found is None:
            break
        marker, pos = data[found.start()], found.start() + 1
        if marker == _SOS:
            if size is None:
                raise _broken("a JPEG whose scan comes before its frame header")
            return size
        if marker in (_SOI, _EOI, 0x00):  # 0x00: a stuffed byte, no marker
            break
        if marker in _STANDALONE:
            continue
        if pos + 2 > len(data):
            break
        (length,) = _U16.unpack_from(data, pos)
        if length < 2:
            break
        if marker in _SOF:
            if length < 7 or pos + 7 > len(data):
                break
            (height,), (width,) = _U16.unpack_from(data, pos + 3), _U16.unpack_from(data, pos + 5)
            size = (width, height)
        pos += length
    else:
        raise FrameError(f"JPEG image with more than {MAX_SEGMENTS} marker segments before its "
                         "scan (refused unread)")
    raise _broken("a JPEG whose header is broken or cut short")
