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
        raw = r.list(key)
        if len(raw) != 5:
            raise WireError(f"{r.path}.{key}: a hop has 5 fields, got {len(raw)}")
        node = r.item(key, 0).str("_")
        seg = r.item(key, 1).int("_")
        a, s, f = (r.item(key, i).float("_") for i in (2, 3, 4))
        return cls(node, seg, a, s, f)


def _hops(r: Reader, key: str) -> tuple[Hop, ...]:
    outer = Reader({f"h{i}": v for i, v in enumerate(r.list(key))}, f"{r.path}.{key}")
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
        prio = r.float("prio")
        if prio <= 0:
            raise WireError(f"{r.path}.prio: priority must be > 0, got {prio}")
        return cls(r.str("task"), r.str("src"), r.str("frame"), prio, r.float("created"),
                   r.opt_float("deadline"), r.int("attempt"), _hops(r, "hops"))


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
        return cls(r.str("model"), r.int("seg"), tuple(Sample.from_wire(s) for s in r.maps("samples")),
                   Tensor.from_wire(r.map("tensor")),
                   None if emb is None else Tensor.from_wire(emb), r.float("sent"))


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
        return cls(r.str("model"), r.int("seg"), r.int("queued"), r.float("backlog_s"),
                   r.float("rate"), r.float("batch"), r.int("exited"), r.int("fwd"))


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
        return cls(r.str("role"), r.str("node"), r.bool("online"), r.int("seq"), r.float("ts"),
                   tuple(SegmentLoad.from_wire(s) for s in r.maps("segments")),
                   r.float("flops"), r.float("cap_s"), {k: stats.float(k) for k in stats.keys()})


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
        reason = r.str("reason")
        if reason not in EXIT_REASONS:
            raise WireError(f"{r.path}.reason: {reason!r} is not one of {', '.join(EXIT_REASONS)}")
        return cls(r.str("task"), r.str("src"), r.str("frame"), r.int("attempt"), r.int("label"),
                   r.float("conf"), r.int("exit"), reason, r.str("node"),  # type: ignore[arg-type]
                   r.float("ts"), _hops(r, "hops"), tuple(r.floats("thr")), r.float("created"))


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
        for node in nodes_r.keys():
            refs = []
            for i in range(len(nodes_r.list(node))):
                pair = nodes_r.item(node, i)
                items = pair.list("_")
                if len(items) != 2:
                    raise WireError(f"{pair.path}: a segment reference is [model, segment]")
                refs.append(SegmentRef(pair.item("_", 0).str("_"), pair.item("_", 1).int("_")))
            nodes[node] = tuple(refs)
        routes_r = r.map("routes")
        routes: dict[str, dict[int, str]] = {}
        for src in routes_r.keys():
            route = routes_r.map(src)
            parsed: dict[int, str] = {}
            for key in route.keys():
                if not key.isdigit():
                    raise WireError(f"{route.path}: segment key {key!r} is not a number")
                parsed[int(key)] = route.str(key)
            routes[src] = parsed
        return cls(r.int("epoch"), r.float("ts"), nodes, routes)


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
        crit = r.str("criterion")
        if crit not in CRITERIA:
            raise WireError(f"{r.path}.criterion: {crit!r} is not one of {', '.join(CRITERIA)}")
        return cls(r.str("model"), r.int("epoch"), r.float("ts"), crit,  # type: ignore[arg-type]
                   tuple(r.floats("thr")), r.opt_float("target"), r.float("expected"))


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
        label = r.int("label") if r.has("label") else None
        return cls(r.str("frame"), r.float("ts"), r.opt_bytes("image"),
                   None if tensor is None else Tensor.from_wire(tensor), r.opt_float("deadline"),
                   label)
