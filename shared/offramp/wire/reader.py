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
    """Typed, path-aware access to a decoded map; each miss raises WireError naming the field.

    The path is built only when an error names it: a reader made for one array cell or one
    map of a list keeps its parent and the step to it, since formatting a path per field cost
    more than decoding the field (packets carry a header per sample)."""

    __slots__ = ("_map", "_where")

    def __init__(self, mapping: Mapping[str, Any], path: str | tuple[Reader, str]) -> None:
        self._map = mapping
        self._where = path

    @property
    def path(self) -> str:
        where = self._where
        if isinstance(where, str):
            return where
        parent, step = where
        return f"{parent.path}{step}"

    def _raw(self, key: str, optional: bool = False) -> Any:
        try:
            return self._map[key]
        except KeyError:
            if optional:
                return None
            raise WireError(f"{self.path}.{key}: missing") from None

    def _bad(self, key: str, expected: str, value: Any) -> WireError:
        return WireError(f"{self.path}.{key}: expected {expected}, got {type(value).__name__}")

    @property
    def fields(self) -> Mapping[str, Any]:
        """The decoded map itself, for a fast path that checks types at once and falls back to
        the typed accessors, which name what is wrong."""
        return self._map

    def has(self, key: str) -> bool:
        return key in self._map and self._map[key] is not None

    # Each accessor takes the exact type at once (the common case: heartbeats decode tens of
    # fields, a quarter of a worker's event-loop time at low rates) and checks the rest.
    def text(self, key: str) -> str:
        value = self._raw(key)
        if type(value) is str:
            return value
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def opt_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def integer(self, key: str) -> int:
        value = self._raw(key)
        if type(value) is int:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def number(self, key: str) -> float:
        value = self._raw(key)
        if type(value) is float and value - value == 0.0:  # finite: inf - inf and nan are nan
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        result = float(value)
        if not math.isfinite(result):
            raise WireError(f"{self.path}.{key}: must be finite, got {result}")
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

    def blobs(self, key: str) -> list[bytes]:
        """A list of byte strings."""
        items = self.array(key)
        for i, item in enumerate(items):
            if not isinstance(item, bytes):
                raise self._bad(f"{key}[{i}]", "binary data", item)
        return items

    def array(self, key: str) -> list[Any]:
        value = self._raw(key)
        if not isinstance(value, list):
            raise self._bad(key, "an array", value)
        return value

    def numbers(self, key: str) -> list[float]:
        values = self.array(key)
        if all(type(v) is float and math.isfinite(v) for v in values):
            return values  # the common case, checked at once
        return [self.item(key, i).number("_") for i in range(len(values))]

    def texts(self, key: str) -> list[str]:
        values = self.array(key)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise WireError(f"{self.path}.{key}[{i}]: expected a string, got {type(v).__name__}")
        return values

    def map(self, key: str) -> Reader:
        value = self._raw(key)
        if not isinstance(value, dict):
            raise self._bad(key, "a map", value)
        return Reader(value, (self, f".{key}"))

    def opt_map(self, key: str) -> Reader | None:
        return self.map(key) if self.has(key) else None

    def maps(self, key: str) -> list[Reader]:
        out = []
        for i, value in enumerate(self.array(key)):
            if not isinstance(value, dict):
                raise WireError(f"{self.path}.{key}[{i}]: expected a map, got {type(value).__name__}")
            out.append(Reader(value, (self, f".{key}[{i}]")))
        return out

    def rows(self, key: str, width: int) -> list[list[Reader]]:
        """Array ``key`` of fixed-width arrays, each cell wrapped as by :meth:`item`."""
        out = []
        for i, row in enumerate(self.array(key)):
            if not isinstance(row, list) or len(row) != width:
                raise WireError(f"{self.path}.{key}[{i}]: expected an array of {width}")
            out.append([Reader({"_": cell}, (self, f".{key}[{i}][{j}]"))
                        for j, cell in enumerate(row)])
        return out

    def item(self, key: str, index: int) -> Reader:
        """Wrap element ``index`` of array ``key`` as a one-field reader under the name ``_``."""
        return Reader({"_": self.array(key)[index]}, (self, f".{key}[{index}]"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        for key in self._map:
            if not isinstance(key, str):
                raise WireError(f"{self.path}: map key {key!r} is not a string")
        return list(self._map)
