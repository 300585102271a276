"""What a camera reads on ``results/{source}``, JSON so that any MQTT tool reads it: a result
per frame, or, for frames shed under load, one refusal listing many frames' ids.

:func:`read_results` reads either as per-frame :class:`Result` values, so that a client counts
every frame's one outcome the same way."""

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


REFUSAL = "refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Frames of one source answered ``dropped`` together (load shed at admission): one
    message per source and interval instead of one per frame. ``frames`` maps each reason to
    the ids of the frames refused for it."""

    source: str
    frames: dict[str, list[str]]
    ts: float = 0.0
    kind: str = REFUSAL
    v: int = VERSION

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.frames.values())

    def to_json(self) -> bytes:
        obj = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Refusal:
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise WireError(f"refusal: unknown fields {sorted(unknown)}")
        frames = obj.get("frames")
        if not isinstance(obj.get("source"), str):
            raise WireError("refusal.source: expected a string")
        if not isinstance(frames, dict) or not all(
                isinstance(reason, str) and isinstance(ids, list)
                and all(isinstance(i, str) for i in ids) for reason, ids in frames.items()):
            raise WireError("refusal.frames: expected {reason: [frame id, ...]}")
        ts = obj.get("ts", 0.0)
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise WireError("refusal.ts: expected a number")
        return cls(source=obj["source"], frames=frames, ts=float(ts))

    def results(self) -> list[Result]:
        """One ``dropped`` result per frame (no task id: the frame was never admitted)."""
        return [Result(task_id="", source=self.source, frame_id=frame_id, status="dropped",
                       error=reason, ts=self.ts)
                for reason, ids in self.frames.items() for frame_id in ids]


def read_results(data: bytes | str) -> list[Result]:
    """The per-frame results in a message of ``results/{source}``: one for a result, one per
    frame for a refusal. Raises WireError for anything else."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"result: not JSON ({exc})") from None
    if isinstance(obj, dict) and obj.get("kind") == REFUSAL:
        if obj.get("v") != VERSION:
            raise WireError(f"refusal: unsupported format version {obj.get('v')!r}")
        return Refusal.from_obj(obj).results()
    return [Result.from_json(data)]
