"""Strict msgpack framing: size limits, version check, and typed field access that names the path.

Every decode problem, whatever its cause (random bytes, truncation, wrong types, unknown
versions, over-limit sizes), surfaces as one :class:`~offramp.errors.WireError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from offramp.errors import WireError

VERSION = 1
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


def pack(kind: str, body: dict[str, Any]) -> bytes:
    """msgpack a message body with its version and kind. Buffers (memoryview) pack as bin."""
    packed: bytes = msgpack.packb({"v": VERSION, "k": kind, **body}, use_bin_type=True)
    return packed


def unpack(data: bytes | bytearray | memoryview, kind: str, *, max_bytes: int) -> Reader:
    """Unpack one message of ``kind``; raise WireError for anything that is not exactly that."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"{kind}: payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"{kind}: message of {len(data)} bytes is over the limit of {max_bytes}")
    if len(data) == 0:
        raise WireError(f"{kind}: empty message")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_bytes, max_str_len=1 << 20, max_array_len=1 << 20,
            max_map_len=1 << 16, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here.
        raise WireError(f"{kind}: not a valid msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{kind}: expected a map at the top, got {type(obj).__name__}")
    top = Reader(obj, kind)
    version = top.integer("v")
    if version != VERSION:
        raise WireError(f"{kind}: unsupported format version {version} (this build reads {VERSION})")
    got = top.text("k")
    if got != kind:
        raise WireError(f"{kind}: message is a {got!r}, not a {kind!r}")
    return top


class Reader:
    """Typed, path-aware access to a decoded map; each miss raises WireError naming the field."""

    __slots__ = ("_map", "_path")

    def __init__(self, mapping: Mapping[str, Any], path: str) -> None:
        self._map = mapping
        self._path = path

    def _raw(self, key: str, optional: bool = False) -> Any:
        if key not in self._map:
            if optional:
                return None
            raise WireError(f"{self._path}.{key}: missing")
        return self._map[key]

    def _bad(self, key: str, expected: str, value: Any) -> WireError:
        return WireError(f"{self._path}.{key}: expected {expected}, got {type(value).__name__}")

    def has(self, key: str) -> bool:
        return key in self._map and self._map[key] is not None

    def text(self, key: str) -> str:
        value = self._raw(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def opt_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def integer(self, key: str) -> int:
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def number(self, key: str) -> float:
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        result = float(value)
        if not math.isfinite(result):
            raise WireError(f"{self._path}.{key}: must be finite, got {result}")
        return result

    def opt_number(self, key: str) -> float | None:
        return self.number(key) if self.has(key) else None

    def flag(self, key: str) -> bool:
        value = self._raw(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def blob(self, key: str) -> bytes:
        value = self._raw(key)
        if not isinstance(value, bytes):
            raise self._bad(key, "binary data", value)
        return value

    def opt_blob(self, key: str) -> bytes | None:
        return self.blob(key) if self.has(key) else None

    def array(self, key: str) -> list[Any]:
        value = self._raw(key)
        if not isinstance(value, list):
            raise self._bad(key, "an array", value)
        return value

    def numbers(self, key: str) -> list[float]:
        return [self.item(key, i).number("_") for i in range(len(self.array(key)))]

    def texts(self, key: str) -> list[str]:
        values = self.array(key)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise WireError(f"{self._path}.{key}[{i}]: expected a string, got {type(v).__name__}")
        return values

    def map(self, key: str) -> Reader:
        value = self._raw(key)
        if not isinstance(value, dict):
            raise self._bad(key, "a map", value)
        return Reader(value, f"{self._path}.{key}")

    def opt_map(self, key: str) -> Reader | None:
        return self.map(key) if self.has(key) else None

    def maps(self, key: str) -> list[Reader]:
        out = []
        for i, value in enumerate(self.array(key)):
            if not isinstance(value, dict):
                raise WireError(f"{self._path}.{key}[{i}]: expected a map, got {type(value).__name__}")
            out.append(Reader(value, f"{self._path}.{key}[{i}]"))
        return out

    def rows(self, key: str, width: int) -> list[list[Reader]]:
        """Array ``key`` of fixed-width arrays, each cell wrapped as by :meth:`item`."""
        out = []
        for i, row in enumerate(self.array(key)):
            if not isinstance(row, list) or len(row) != width:
                raise WireError(f"{self._path}.{key}[{i}]: expected an array of {width}")
            out.append([Reader({"_": cell}, f"{self._path}.{key}[{i}][{j}]")
                        for j, cell in enumerate(row)])
        return out

    def item(self, key: str, index: int) -> Reader:
        """Wrap element ``index`` of array ``key`` as a one-field reader under the name ``_``."""
        return Reader({"_": self.array(key)[index]}, f"{self._path}.{key}[{index}]")

    @property
    def path(self) -> str:
        return self._path

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        for key in self._map:
            if not isinstance(key, str):
                raise WireError(f"{self._path}: map key {key!r} is not a string")
        return list(self._map)
