"""What each recently answered frame was told, so that a frame sent again gets the same answer.

A camera that has no answer for a frame may publish it again under the same frame id (docs/
wire.md, "Sending a frame again"): a broker killed with the frame, or with its answer, in
memory loses them, and nothing else can tell. Within ``OFFRAMP_ADMISSION_DEDUP_S`` such a
frame is a duplicate: one still in flight gets its one answer when it is done, and one that was
answered gets that answer again (the same result, task id included, or its refusal's reason
in a new refusal), instead of nothing. Only a member's own answers are kept: after a
takeover, frames the member before answered come again because it died before acknowledging
them to the broker, and they get no second answer. Kept by age (the dedup window) and by count
(``OFFRAMP_ADMISSION_ANSWERS_KEPT``, the oldest go first); pure apart from the clock passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Told:
    """One frame's answer: its result as published (JSON), or the reason it was refused in a
    refusal."""

    result: bytes | None = None
    refused: str | None = None


class Answers:
    def __init__(self, keep_s: float, max_kept: int) -> None:
        self.keep_s = keep_s
        self.max_kept = max_kept
        self._told: OrderedDict[tuple[str, str], tuple[float, Told]] = OrderedDict()
        self.evicted = 0  # answers forgotten for the count bound before their age

    def __len__(self) -> int:
        return len(self._told)

    def keep(self, source: str, frame_id: str, told: Told, now: float) -> None:
        if self.keep_s <= 0 or self.max_kept <= 0:
            return
        self._forget_older(now)
        key = (source, frame_id)
        self._told.pop(key, None)  # re-inserted last: the dict stays oldest first
        self._told[key] = (now, told)
        while len(self._told) > self.max_kept:
            self._told.popitem(last=False)
            self.evicted += 1

    def told(self, source: str, frame_id: str, now: float) -> Told | None:
        """What the frame was told, if it was answered within the window and is still kept."""
        self._forget_older(now)
        kept = self._told.get((source, frame_id))
        return kept[1] if kept is not None else None

    def _forget_older(self, now: float) -> None:
        while self._told and next(iter(self._told.values()))[0] < now - self.keep_s:
            self._told.popitem(last=False)
