"""The messages services exchange (docs/wire.md). msgpack, version 1.

Each message is a frozen dataclass with ``encode() -> bytes`` and ``decode(data, max_bytes=...)``.
Decoding is strict and raises :class:`~offramp.errors.WireError` only. The JSON result that
clients read is in :mod:`offramp.wire.result`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import msgpack

from offramp.errors import WireError
from offramp.wire.base import WireMessage
from offramp.wire.reader import Reader
from offramp.wire.tensor import Tensor

ExitReason = Literal["threshold", "final", "deadline", "feature-difference"]
EXIT_REASONS: tuple[str, ...] = ("threshold", "final", "deadline", "feature-difference")
Criterion = Literal["confidence", "entropy", "margin", "feature-difference"]
CRITERIA: tuple[str, ...] = ("confidence", "entropy", "margin", "feature-difference")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hop:
    """One segment run on one node: when the sample arrived, started computing, finished."""

    node: str
    segment: int
    arrived: float
    started: float
    finished: float

    def to_wire(self) -> list[Any]:
        return [self.node, self.segment, self.arrived, self.started, self.finished]

    @classmethod
    def from_wire(cls, r: Reader, key: str) -> Hop:
        raw = r.array(key)
        if len(raw) != 5:
            raise WireError(f"{r.path}.{key}: a hop has 5 fields, got {len(raw)}")
        node = r.item(key, 0).text("_")
        seg = r.item(key, 1).integer("_")
        a, s, f = (r.item(key, i).number("_") for i in (2, 3, 4))
        return cls(node=node, segment=seg, arrived=a, started=s, finished=f)


def _finite(v: Any) -> bool:
    return (type(v) is float and math.isfinite(v)) or type(v) is int


def _hops(r: Reader, key: str) -> tuple[Hop, ...]:
    """Every sample carries its hops, so they are checked in one pass: three floats whose sum
    is finite are each finite. Only a hop that fails (or has integer times, or times whose sum
    overflows) goes through :meth:`Hop.from_wire`, which names what is wrong."""
    raw = r.array(key)
    out = []
    for i, h in enumerate(raw):
        if type(h) is list and len(h) == 5:
            node, seg, a, s, f = h
            if (type(node) is str and type(seg) is int and type(a) is float
                    and type(s) is float and type(f) is float and math.isfinite(a + s + f)):
                out.append(Hop(node=node, segment=seg, arrived=a, started=s, finished=f))
                continue
        out.append(Hop.from_wire(Reader({f"{key}[{i}]": h}, (r, "")), f"{key}[{i}]"))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """Per-sample header of an activation packet (one per row of the batch tensor)."""

    task_id: str
    source: str
    frame_id: str
    priority: float = 1.0
    created: float = 0.0
    deadline: float | None = None
    attempt: int = 0
    hops: tuple[Hop, ...] = ()
    trace: str | None = None  # W3C traceparent of the frame's span, when the frame is traced

    def to_wire(self) -> dict[str, Any]:
        out = {"task": self.task_id, "src": self.source, "frame": self.frame_id,
               "prio": self.priority, "created": self.created, "deadline": self.deadline,
               "attempt": self.attempt, "hops": [h.to_wire() for h in self.hops]}
        if self.trace is not None:
            out["trace"] = self.trace
        return out

    @classmethod
    def from_wire(cls, r: Reader) -> Sample:
        m = r.fields  # one header per sample per hop: the well-formed case is checked at once
        values: list[Any] = [m.get(k) for k in ("task", "src", "frame", "prio", "created",
                                                 "deadline", "attempt", "trace")]
        task, src, frame, prio, created, deadline, attempt, trace = values
        if (type(task) is str and type(src) is str and type(frame) is str and _finite(prio)
                and prio > 0 and _finite(created) and (deadline is None or _finite(deadline))
                and type(attempt) is int and (trace is None or type(trace) is str)):
            return cls(task_id=task, source=src, frame_id=frame, priority=float(prio), created=float(created),
                       deadline=None if deadline is None else float(deadline), attempt=attempt,
                       hops=_hops(r, "hops"), trace=trace)
        prio = r.number("prio")
        if prio <= 0:
            raise WireError(f"{r.path}.prio: priority must be > 0, got {prio}")
        return cls(task_id=r.text("task"), source=r.text("src"), frame_id=r.text("frame"), priority=prio,
                   created=r.number("created"), deadline=r.opt_number("deadline"),
                   attempt=r.integer("attempt"), hops=_hops(r, "hops"),
                   trace=r.opt_text("trace"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivationPacket(WireMessage):
    """A micro-batch on its way to ``segment`` of ``model``: headers and either the activation
    tensor (with an optional embedding) or, for segment 1 only, each frame's ``inputs`` as the
    camera sent them (JPEG, PNG or ``.npy`` bytes), which the first worker decodes: the first
    hop then carries the camera's bytes, not a float32 tensor several times their size."""

    KIND: ClassVar[str] = "act"
    model: str
    segment: int
    samples: tuple[Sample, ...]
    tensor: Tensor | None = None
    inputs: tuple[bytes, ...] = ()
    embedding: Tensor | None = None
    sent: float = 0.0
    sender: str = ""  # the node that spent its credit on this packet ("" : no credit used)
    sender_boot: float = 0.0  # which run of that node (credits restart with the process)

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0:
            raise WireError("act: a packet carries at least one sample")
        if self.segment < 1:
            raise WireError(f"act: segment must be >= 1, got {self.segment}")
        if (self.tensor is None) == (not self.inputs):
            raise WireError("act: a packet carries exactly one of tensor and inputs")
        if self.inputs:
            if self.segment != 1 or self.embedding is not None:
                raise WireError("act: inputs go to segment 1 only, without an embedding")
            if len(self.inputs) != n:
                raise WireError(f"act: {len(self.inputs)} inputs for {n} samples")
        elif self.tensor is not None and (not self.tensor.shape or self.tensor.shape[0] != n):
            raise WireError(f"act: tensor batch {self.tensor.shape[:1]} does not match {n} samples")
        if self.embedding is not None and (
            not self.embedding.shape or self.embedding.shape[0] != n
        ):
            raise WireError(f"act: embedding batch {self.embedding.shape[:1]} != {n} samples")

    def to_wire(self) -> dict[str, Any]:
        body = {"model": self.model, "seg": self.segment,
                "samples": [s.to_wire() for s in self.samples],
                "tensor": None if self.tensor is None else self.tensor.to_wire(),
                "emb": None if self.embedding is None else self.embedding.to_wire(),
                "sent": self.sent, "from": self.sender, "boot": self.sender_boot}
        if self.inputs:
            body["inputs"] = list(self.inputs)
        return body

    @classmethod
    def from_wire(cls, r: Reader) -> ActivationPacket:
        emb = r.opt_map("emb")
        tensor = r.opt_map("tensor")
        inputs = r.blobs("inputs") if r.has("inputs") else ()
        return cls(model=r.text("model"), segment=r.integer("seg"),
                   samples=tuple(Sample.from_wire(s) for s in r.maps("samples")),
                   tensor=None if tensor is None else Tensor.from_wire(tensor),
                   inputs=tuple(inputs),
                   embedding=None if emb is None else Tensor.from_wire(emb), sent=r.number("sent"),
                   sender=r.text("from"), sender_boot=r.number("boot"))


_COMPLETION_KEYS = ("task", "src", "frame", "attempt", "label", "conf", "exit", "reason", "node",
                    "ts", "thr", "created")


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """One finished frame: where it exited, with what label and confidence, by which path."""

    task_id: str
    source: str
    frame_id: str
    attempt: int
    label: int
    confidence: float
    exit_index: int
    reason: ExitReason
    node: str
    ts: float
    hops: tuple[Hop, ...] = ()
    thresholds: tuple[float, ...] = ()
    created: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task_id, "src": self.source, "frame": self.frame_id,
                "attempt": self.attempt, "label": self.label, "conf": self.confidence,
                "exit": self.exit_index, "reason": self.reason, "node": self.node, "ts": self.ts,
                "hops": [h.to_wire() for h in self.hops], "thr": list(self.thresholds),
                "created": self.created}

    @classmethod
    def from_wire(cls, r: Reader) -> Completion:
        m = r.fields  # the admission-controller and the arbiter read one per frame
        values: list[Any] = [m.get(k) for k in _COMPLETION_KEYS]
        task, src, frame, attempt, label, conf, exit_, reason, node, ts, thr, created = values
        if (type(task) is str and type(src) is str and type(frame) is str
                and type(attempt) is int and type(label) is int and type(exit_) is int
                and reason in EXIT_REASONS and type(node) is str and type(conf) is float
                and type(ts) is float and type(created) is float
                and math.isfinite(conf + ts + created) and type(thr) is list
                and all(type(t) is float for t in thr) and math.isfinite(sum(thr))):
            return cls(task_id=task, source=src, frame_id=frame, attempt=attempt, label=label,
                       confidence=conf, exit_index=exit_, reason=cast(ExitReason, reason), node=node, ts=ts,
                       hops=_hops(r, "hops"), thresholds=tuple(thr), created=created)
        reason = r.text("reason")
        if reason not in EXIT_REASONS:
            raise WireError(f"{r.path}.reason: {reason!r} is not one of {', '.join(EXIT_REASONS)}")
        return cls(task_id=r.text("task"), source=r.text("src"), frame_id=r.text("frame"),
                   attempt=r.integer("attempt"), label=r.integer("label"), confidence=r.number("conf"),
                   exit_index=r.integer("exit"), reason=cast(ExitReason, reason),
                   node=r.text("node"), ts=r.number("ts"), hops=_hops(r, "hops"),
                   thresholds=tuple(r.numbers("thr")), created=r.number("created"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Moved:
    """A sample its holder passed on to another node (``attempt``: which dispatch of it)."""

    task_id: str
    attempt: int
    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """A sample a worker could not compute, and why (its input did not decode): its frame is
    answered ``error`` with that reason, not dispatched again."""

    task_id: str
    attempt: int
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """A sample a worker received and could not take (its queue was full, or it does not host
    the segment any more): its owner dispatches the frame again at once, instead of waiting
    for the progress timeout."""

    task_id: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DoneReport(WireMessage):
    """A worker's report on the frames of one source: the ones one micro-batch finished, the
    ones it passed on to another node (so that their owner knows who holds them), the ones
    it could not compute, and the ones it could not take. One message per batch and source,
    not per frame (the admission-controller and the arbiter read every one)."""

    KIND: ClassVar[str] = "done"
    completions: tuple[Completion, ...] = ()
    moved: tuple[Moved, ...] = ()
    failed: tuple[Failed, ...] = ()
    refused: tuple[Refused, ...] = ()

    def __post_init__(self) -> None:
        if not self.completions and not self.moved and not self.failed and not self.refused:
            raise WireError("done: a report carries at least one completion, move or failure")

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"items": [c.to_wire() for c in self.completions],
                                "moved": [[m.task_id, m.attempt, m.node] for m in self.moved]}
        if self.failed:
            body["failed"] = [[f.task_id, f.attempt, f.error] for f in self.failed]
        if self.refused:
            body["refused"] = [[f.task_id, f.attempt, f.reason] for f in self.refused]
        return body

    @classmethod
    def from_wire(cls, r: Reader) -> DoneReport:
        moved = tuple(Moved(task_id=row[0].text("_"), attempt=row[1].integer("_"),
                            node=row[2].text("_"))
                      for row in r.rows("moved", 3)) if r.has("moved") else ()
        failed = tuple(Failed(task_id=row[0].text("_"), attempt=row[1].integer("_"),
                              error=row[2].text("_"))
                       for row in r.rows("failed", 3)) if r.has("failed") else ()
        refused = tuple(Refused(task_id=row[0].text("_"), attempt=row[1].integer("_"),
                                reason=row[2].text("_"))
                        for row in r.rows("refused", 3)) if r.has("refused") else ()
        return cls(completions=tuple(Completion.from_wire(c) for c in r.maps("items")),
                   moved=moved, failed=failed, refused=refused)


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameEnvelope(WireMessage):
    """A camera frame with metadata: exactly one of ``image`` (JPEG/PNG bytes) or ``tensor``."""

    KIND: ClassVar[str] = "frame"
    frame_id: str
    ts: float
    image: bytes | None = None
    tensor: Tensor | None = None
    deadline: float | None = None
    label: int | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.tensor is None):
            raise WireError("frame: exactly one of image and tensor must be present")

    def to_wire(self) -> dict[str, Any]:
        return {"frame": self.frame_id, "ts": self.ts, "image": self.image,
                "tensor": None if self.tensor is None else self.tensor.to_wire(),
                "deadline": self.deadline, "label": self.label}

    @staticmethod
    def claimed_id(data: bytes) -> str | None:
        """The ``frame`` of a msgpack map that failed to decode as an envelope, when it is
        printable text of at most 256 characters (its error is answered under it); else
        None."""
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            return None
        frame = body.get("frame") if isinstance(body, dict) else None
        ok = isinstance(frame, str) and frame.isprintable() and 0 < len(frame) <= 256
        return frame if ok else None

    @classmethod
    def from_wire(cls, r: Reader) -> FrameEnvelope:
        tensor = r.opt_map("tensor")
        label = r.integer("label") if r.has("label") else None
        return cls(frame_id=r.text("frame"), ts=r.number("ts"), image=r.opt_blob("image"),
                   tensor=None if tensor is None else Tensor.from_wire(tensor),
                   deadline=r.opt_number("deadline"), label=label)
