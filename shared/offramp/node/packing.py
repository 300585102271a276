"""Batches of samples as packets that fit what the bus takes (the broker's maximum packet size,
which MQTT v5 states in CONNACK, and ``OFFRAMP_MAX_MESSAGE_BYTES``): a packet over it goes as
several packets of fewer samples, each a batch of its own, so nothing on the receiving side
changes. A sample whose packet alone is over it cannot go; it is handed back to the sender,
who names it (and, at the source, answers its frame).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Packed(Generic[T]):
    split: int = 0  # packets that went as several
    too_large: list[tuple[T, int]] = field(default_factory=list)  # (sample, its packet's bytes)


async def send_within(items: Sequence[T], cap: int, pack: Callable[[Sequence[T]], Awaitable[bytes]],
                      send: Callable[[Sequence[T], bytes], Awaitable[None]]) -> Packed[T]:
    """``send`` each part of ``items`` packed by ``pack`` whose packet is at most ``cap`` bytes
    (0: no limit): all of them in one packet where it fits, else in parts sized from the
    bytes per sample with a 10% margin, each checked again."""
    out: Packed[T] = Packed()

    async def go(part: Sequence[T]) -> None:
        payload = await pack(part)
        if not cap or len(payload) <= cap:
            await send(part, payload)
            return
        if len(part) == 1:
            out.too_large.append((part[0], len(payload)))
            return
        out.split += 1
        per = min(len(part) - 1, max(1, len(part) * cap * 9 // (10 * len(payload))))
        for start in range(0, len(part), per):
            await go(part[start:start + per])

    await go(items)
    return out


__all__ = ["Packed", "send_within"]
