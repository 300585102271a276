"""The base of every msgpack message: ``encode()`` and a strict ``decode()``."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from offramp.wire.reader import DEFAULT_MAX_BYTES, Reader, pack, unpack


class WireMessage:
    KIND: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, r: Reader) -> Self:
        raise NotImplementedError

    def encode(self) -> bytes:
        return pack(self.KIND, self.to_wire())

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, *,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Self:
        return cls.from_wire(unpack(data, cls.KIND, max_bytes=max_bytes))
