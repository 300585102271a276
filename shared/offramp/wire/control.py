"""Control messages, published retained: the allocation plan and the exit policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from offramp.errors import WireError
from offramp.wire.base import WireMessage
from offramp.wire.messages import CRITERIA, Criterion
from offramp.wire.reader import Reader


@dataclass(frozen=True, slots=True, kw_only=True)
class SegmentRef:
    model: str
    segment: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan(WireMessage):
    """The allocation plan (docs/algorithms.md 3.4): which segments each node hosts, each source's
    route (segment -> node) and the latency the scheduler expects for it; ``reason`` says why it
    was made (``start``, ``node-joined``, ``node-lost``, ``load-shift``, ``sources``)."""

    KIND: ClassVar[str] = "plan"
    epoch: int
    ts: float
    nodes: dict[str, tuple[SegmentRef, ...]] = field(default_factory=dict)
    routes: dict[str, dict[int, str]] = field(default_factory=dict)
    expected_s: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def hosts(self, model: str, segment: int) -> list[str]:
        ref = SegmentRef(model=model, segment=segment)
        return sorted(n for n, refs in self.nodes.items() if ref in refs)

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ts": self.ts,
                "nodes": {n: [[s.model, s.segment] for s in segs] for n, segs in self.nodes.items()},
                "routes": {src: {str(k): v for k, v in route.items()}
                           for src, route in self.routes.items()},
                "expected": self.expected_s, "reason": self.reason}

    @classmethod
    def from_wire(cls, r: Reader) -> Plan:
        nodes_r = r.map("nodes")
        nodes = {node: tuple(SegmentRef(model=row[0].text("_"), segment=row[1].integer("_"))
                             for row in nodes_r.rows(node, 2)) for node in nodes_r}
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
        exp = r.map("expected")
        return cls(epoch=r.integer("epoch"), ts=r.number("ts"), nodes=nodes, routes=routes,
                   expected_s={k: exp.number(k) for k in exp}, reason=r.text("reason"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitPolicy(WireMessage):
    """Thresholds for every exit but the last, published retained by the exit-arbiter, with
    the dataset the served model was trained on (so a client can send it the right images)
    and the identity of the bundle they were calibrated on (a worker on other graphs of the
    model does not apply them)."""

    KIND: ClassVar[str] = "policy"
    model: str
    epoch: int
    ts: float
    criterion: Criterion
    thresholds: tuple[float, ...]
    target_accuracy: float | None = None
    expected_accuracy: float = 0.0
    dataset: str = ""  # '': not known (a bundle that does not say)
    bundle: str = ""  # name@digest ('': not said)

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "epoch": self.epoch, "ts": self.ts,
                "criterion": self.criterion, "thr": list(self.thresholds),
                "target": self.target_accuracy, "expected": self.expected_accuracy,
                "dataset": self.dataset, **({"bundle": self.bundle} if self.bundle else {})}

    @classmethod
    def from_wire(cls, r: Reader) -> ExitPolicy:
        crit = r.text("criterion")
        if crit not in CRITERIA:
            raise WireError(f"{r.path}.criterion: {crit!r} is not one of {', '.join(CRITERIA)}")
        return cls(model=r.text("model"), epoch=r.integer("epoch"), ts=r.number("ts"),
                   criterion=cast(Criterion, crit),
                   thresholds=tuple(r.numbers("thr")), target_accuracy=r.opt_number("target"),
                   expected_accuracy=r.number("expected"), dataset=r.opt_text("dataset") or "",
                   bundle=r.opt_text("bundle") or "")
