"""What a camera reads on ``control/pace/{source}``, JSON and retained so that any MQTT client
reads it, also one that connects later: the rate the admission-controller will take frames of
the source at now. A camera that sends faster than this gets the rest answered ``dropped``, so
it skips frames at the camera instead (docs/wire.md, "Pace")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

from offramp.errors import WireError
from offramp.wire.reader import VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """``rate_hz``: frames per second of ``source`` the system takes now (> 0); ``by``: the
    admission-controller that said it; ``ts``: when; ``valid_s``: how long after ``ts`` it
    holds unless said again (it is said again well before)."""

    KIND: ClassVar[str] = "pace"
    source: str
    rate_hz: float
    by: str = ""
    ts: float = 0.0
    valid_s: float = 15.0

    def holds(self, now: float) -> bool:
        """Whether it still holds at ``now`` (Unix seconds)."""
        return now - self.ts < self.valid_s

    def __post_init__(self) -> None:
        if isinstance(self.rate_hz, bool) or not isinstance(self.rate_hz, int | float) \
                or not math.isfinite(self.rate_hz) or self.rate_hz <= 0:
            raise WireError(f"pace.rate_hz: expected a number > 0, got {self.rate_hz!r}")

    def to_json(self) -> bytes:
        return json.dumps({"source": self.source, "rate_hz": round(self.rate_hz, 3),
                           "by": self.by, "ts": self.ts, "valid_s": self.valid_s,
                           "kind": self.KIND, "v": VERSION},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Pace:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError(f"pace: not JSON ({exc})") from None
        if not isinstance(obj, dict) or obj.get("kind") != cls.KIND:
            raise WireError("pace: expected a JSON object with \"kind\": \"pace\"")
        if obj.get("v") != VERSION:
            raise WireError(f"pace: unsupported format version {obj.get('v')!r}")
        for key, kind in (("source", str), ("by", str)):
            if not isinstance(obj.get(key), kind):
                raise WireError(f"pace.{key}: expected a string")
        for key in ("ts", "valid_s"):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise WireError(f"pace.{key}: expected a number")
        return cls(source=obj["source"], rate_hz=obj.get("rate_hz"),  # type: ignore[arg-type]
                   by=obj["by"], ts=float(obj["ts"]), valid_s=float(obj["valid_s"]))
