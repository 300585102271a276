"""The messages services exchange (ARCHITECTURE.md, Wire format). msgpack, version 1.

Each message is a frozen dataclass with ``encode() -> bytes`` and ``decode(data, max_bytes=...)``.
Decoding is strict and raises :class:`~offramp.errors.WireError` only. The JSON result that
clients read is in :mod:`offramp.wire.result`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from offramp.errors import WireError
from offramp.wire.reader import DEFAULT_MAX_BYTES, Reader, pack, unpack
from offramp.wire.tensor import Tensor

ExitReason = Literal["threshold", "final", "deadline", "feature-difference"]
EXIT_REASONS: tuple[str, ...] = ("threshold", "final", "deadline", "feature-difference")
Criterion = Literal["confidence", "entropy", "margin", "feature-difference"]
CRITERIA: tuple[str, ...] = ("confidence", "entropy", "margin", "feature-difference")


class _Message:
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


@dataclass(frozen=True, slots=True)
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
        return cls(node, seg, a, s, f)


def _hops(r: Reader, key: str) -> tuple[Hop, ...]:
    outer = Reader({f"h{i}": v for i, v in enumerate(r.array(key))}, f"{r.path}.{key}")
    return tuple(Hop.from_wire(outer, f"h{i}") for i in range(len(outer.keys())))


@dataclass(frozen=True, slots=True)
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

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task_id, "src": self.source, "frame": self.frame_id,
                "prio": self.priority, "created": self.created, "deadline": self.deadline,
                "attempt": self.attempt, "hops": [h.to_wire() for h in self.hops]}

    @classmethod
    def from_wire(cls, r: Reader) -> Sample:
        prio = r.number("prio")
        if prio <= 0:
            raise WireError(f"{r.path}.prio: priority must be > 0, got {prio}")
        return cls(r.text("task"), r.text("src"), r.text("frame"), prio, r.number("created"),
                   r.opt_number("deadline"), r.integer("attempt"), _hops(r, "hops"))


@dataclass(frozen=True, slots=True)
class ActivationPacket(_Message):
    """A micro-batch on its way to ``segment`` of ``model``: headers, tensor, optional embedding."""

    KIND: ClassVar[str] = "act"
    model: str
    segment: int
    samples: tuple[Sample, ...]
    tensor: Tensor
    embedding: Tensor | None = None
    sent: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0:
            raise WireError("act: a packet carries at least one sample")
        if not self.tensor.shape or self.tensor.shape[0] != n:
            raise WireError(f"act: tensor batch {self.tensor.shape[:1]} does not match {n} samples")
        if self.embedding is not None and (
            not self.embedding.shape or self.embedding.shape[0] != n
        ):
            raise WireError(f"act: embedding batch {self.embedding.shape[:1]} != {n} samples")
        if self.segment < 1:
            raise WireError(f"act: segment must be >= 1, got {self.segment}")

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "seg": self.segment,
                "samples": [s.to_wire() for s in self.samples], "tensor": self.tensor.to_wire(),
                "emb": None if self.embedding is None else self.embedding.to_wire(),
                "sent": self.sent}

    @classmethod
    def from_wire(cls, r: Reader) -> ActivationPacket:
        emb = r.opt_map("emb")
        return cls(r.text("model"), r.integer("seg"), tuple(Sample.from_wire(s) for s in r.maps("samples")),
                   Tensor.from_wire(r.map("tensor")),
                   None if emb is None else Tensor.from_wire(emb), r.number("sent"))


@dataclass(frozen=True, slots=True)
class SegmentLoad:
    """Queue state of one hosted segment, as a worker reports it in its heartbeat."""

    model: str
    segment: int
    queued: int = 0
    backlog_s: float = 0.0
    service_rate: float = 0.0
    mean_batch: float = 0.0
    exited: int = 0
    forwarded: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "seg": self.segment, "queued": self.queued,
                "backlog_s": self.backlog_s, "rate": self.service_rate,
                "batch": self.mean_batch, "exited": self.exited, "fwd": self.forwarded}

    @classmethod
    def from_wire(cls, r: Reader) -> SegmentLoad:
        return cls(r.text("model"), r.integer("seg"), r.integer("queued"), r.number("backlog_s"),
                   r.number("rate"), r.number("batch"), r.integer("exited"), r.integer("fwd"))


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """Liveness and queue state on ``state/{role}/{node}``; the will sends ``online=False``."""

    KIND: ClassVar[str] = "hb"
    role: str
    node: str
    online: bool = True
    seq: int = 0
    ts: float = 0.0
    segments: tuple[SegmentLoad, ...] = ()
    flops_per_s: float = 0.0
    capacity_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"role": self.role, "node": self.node, "online": self.online, "seq": self.seq,
                "ts": self.ts, "segments": [s.to_wire() for s in self.segments],
                "flops": self.flops_per_s, "cap_s": self.capacity_s, "stats": self.stats}

    @classmethod
    def from_wire(cls, r: Reader) -> Heartbeat:
        stats = r.map("stats")
        return cls(r.text("role"), r.text("node"), r.flag("online"), r.integer("seq"), r.number("ts"),
                   tuple(SegmentLoad.from_wire(s) for s in r.maps("segments")),
                   r.number("flops"), r.number("cap_s"), {k: stats.number(k) for k in stats})


@dataclass(frozen=True, slots=True)
class Completion(_Message):
    """A worker's report that it finished a frame; the admission-controller turns it into a result."""

    KIND: ClassVar[str] = "done"
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
        reason = r.text("reason")
        if reason not in EXIT_REASONS:
            raise WireError(f"{r.path}.reason: {reason!r} is not one of {', '.join(EXIT_REASONS)}")
        return cls(r.text("task"), r.text("src"), r.text("frame"), r.integer("attempt"), r.integer("label"),
                   r.number("conf"), r.integer("exit"), reason, r.text("node"),  # type: ignore[arg-type]
                   r.number("ts"), _hops(r, "hops"), tuple(r.numbers("thr")), r.number("created"))


@dataclass(frozen=True, slots=True)
class SegmentRef:
    model: str
    segment: int


@dataclass(frozen=True, slots=True)
class Plan(_Message):
    """The allocation plan: which node hosts which segments, and each source's route."""

    KIND: ClassVar[str] = "plan"
    epoch: int
    ts: float
    nodes: dict[str, tuple[SegmentRef, ...]] = field(default_factory=dict)
    routes: dict[str, dict[int, str]] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ts": self.ts,
                "nodes": {n: [[s.model, s.segment] for s in segs] for n, segs in self.nodes.items()},
                "routes": {src: {str(k): v for k, v in route.items()}
                           for src, route in self.routes.items()}}

    @classmethod
    def from_wire(cls, r: Reader) -> Plan:
        nodes_r = r.map("nodes")
        nodes: dict[str, tuple[SegmentRef, ...]] = {}
        for node in nodes_r:
            refs = []
            for i in range(len(nodes_r.array(node))):
                pair = nodes_r.item(node, i)
                items = pair.array("_")
                if len(items) != 2:
                    raise WireError(f"{pair.path}: a segment reference is [model, segment]")
                refs.append(SegmentRef(pair.item("_", 0).text("_"), pair.item("_", 1).integer("_")))
            nodes[node] = tuple(refs)
        routes_r = r.map("routes")
        routes: dict[str, dict[int, str]] = {}
        for src in routes_r:
            route = routes_r.map(src)
            parsed: dict[int, str] = {}
            for key in route:
                if not key.isdigit():
                    raise WireError(f"{route.path}: segment key {key!r} is not a number")
                parsed[int(key)] = route.text(key)
            routes[src] = parsed
        return cls(r.integer("epoch"), r.number("ts"), nodes, routes)


@dataclass(frozen=True, slots=True)
class ExitPolicy(_Message):
    """Thresholds for every exit but the last, published retained by the exit-arbiter."""

    KIND: ClassVar[str] = "policy"
    model: str
    epoch: int
    ts: float
    criterion: Criterion
    thresholds: tuple[float, ...]
    target_accuracy: float | None = None
    expected_accuracy: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "epoch": self.epoch, "ts": self.ts,
                "criterion": self.criterion, "thr": list(self.thresholds),
                "target": self.target_accuracy, "expected": self.expected_accuracy}

    @classmethod
    def from_wire(cls, r: Reader) -> ExitPolicy:
        crit = r.text("criterion")
        if crit not in CRITERIA:
            raise WireError(f"{r.path}.criterion: {crit!r} is not one of {', '.join(CRITERIA)}")
        return cls(r.text("model"), r.integer("epoch"), r.number("ts"), crit,  # type: ignore[arg-type]
                   tuple(r.numbers("thr")), r.opt_number("target"), r.number("expected"))


@dataclass(frozen=True, slots=True)
class FrameEnvelope(_Message):
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

    @classmethod
    def from_wire(cls, r: Reader) -> FrameEnvelope:
        tensor = r.opt_map("tensor")
        label = r.integer("label") if r.has("label") else None
        return cls(r.text("frame"), r.number("ts"), r.opt_blob("image"),
                   None if tensor is None else Tensor.from_wire(tensor), r.opt_number("deadline"),
                   label)
