"""The JSON result published once per frame on ``results/{source}``, readable by any MQTT tool."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from offramp.errors import WireError
from offramp.wire.reader import VERSION

Status = Literal["ok", "dropped", "expired", "error"]
STATUSES: tuple[str, ...] = ("ok", "dropped", "expired", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One answer to one frame. ``status`` says whether the other fields carry a prediction."""

    task_id: str
    source: str
    frame_id: str
    status: Status
    label: int | None = None
    class_name: str | None = None
    confidence: float | None = None
    exit_index: int | None = None
    reason: str | None = None
    error: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    ts: float = 0.0
    v: int = VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise WireError(f"result.status: {self.status!r} is not one of {', '.join(STATUSES)}")

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies every list and dict, once per frame.
        obj = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Result:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError(f"result: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise WireError("result: expected a JSON object")
        if obj.get("v") != VERSION:
            raise WireError(f"result: unsupported format version {obj.get('v')!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise WireError(f"result: unknown fields {sorted(unknown)}")
        for key in ("task_id", "source", "frame_id", "status"):
            if not isinstance(obj.get(key), str):
                raise WireError(f"result.{key}: expected a string")
        _check_optional(obj, "label", int)
        _check_optional(obj, "confidence", float)
        _check_optional(obj, "exit_index", int)
        try:
            return cls(**obj)
        except TypeError as exc:
            raise WireError(f"result: {exc}") from None


def _check_optional(obj: dict[str, Any], key: str, kind: type) -> None:
    value = obj.get(key)
    if value is None:
        return
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
        raise WireError(f"result.{key}: expected {kind.__name__}, got {value!r}")
