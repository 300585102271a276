"""What nodes say about themselves: heartbeats with queue state, credits and wants.

Credits are the no-herding handshake (docs/algorithms.md 3.3) carried in heartbeats: a worker grants
each sender a cumulative limit of samples for a segment (``SegmentLoad.credits``), and a sender
announces what it would like to send (``Heartbeat.wants``). See :mod:`offramp.policy.credits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from offramp.errors import WireError
from offramp.wire.base import WireMessage
from offramp.wire.control import SegmentRef
from offramp.wire.reader import Reader


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """Cumulative credit for one sender: it may send samples while its count since ``boot``
    (the sender's start time, so a restarted sender starts again from zero) is below ``limit``."""

    boot: float
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
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
    bound: int = 0
    by_priority: tuple[tuple[float, int], ...] = ()  # (priority, queued samples), highest first
    credits: dict[str, Grant] = field(default_factory=dict)

    def queued_at_or_above(self, priority: float) -> int:
        """Samples queued here that a task of ``priority`` waits behind (3.1: Q^(>=m))."""
        if not self.by_priority:
            return self.queued
        return sum(n for p, n in self.by_priority if p >= priority)

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "seg": self.segment, "queued": self.queued,
                "backlog_s": self.backlog_s, "rate": self.service_rate,
                "batch": self.mean_batch, "exited": self.exited, "fwd": self.forwarded,
                "bound": self.bound, "prio": [[p, n] for p, n in self.by_priority],
                "credits": {k: [g.boot, g.limit] for k, g in self.credits.items()}}

    @classmethod
    def from_wire(cls, r: Reader) -> SegmentLoad:
        prio = tuple((row[0].number("_"), row[1].integer("_")) for row in r.rows("prio", 2))
        cr = r.map("credits")
        credits = {}
        for sender in cr:
            raw = cr.array(sender)
            if len(raw) != 2:
                raise WireError(f"{cr.path}.{sender}: a grant is [boot, limit]")
            credits[sender] = Grant(boot=cr.item(sender, 0).number("_"),
                                    limit=cr.item(sender, 1).integer("_"))
        return cls(model=r.text("model"), segment=r.integer("seg"), queued=r.integer("queued"),
                   backlog_s=r.number("backlog_s"), service_rate=r.number("rate"),
                   mean_batch=r.number("batch"), exited=r.integer("exited"), forwarded=r.integer("fwd"),
                   bound=r.integer("bound"), by_priority=prio, credits=credits)


@dataclass(frozen=True, slots=True, kw_only=True)
class Want:
    """A sender's demand: ``count`` samples of ``priority`` it has for ``segment`` of ``model``."""

    model: str
    segment: int
    priority: float
    count: int

    def to_wire(self) -> list[Any]:
        return [self.model, self.segment, self.priority, self.count]


@dataclass(frozen=True, slots=True, kw_only=True)
class SentCount:
    """A sender's cumulative count of samples sent to ``segment`` on ``receiver`` (that run of
    it, ``receiver_boot``), so the receiver can write off credit spent on lost packets."""

    receiver: str
    receiver_boot: float
    model: str
    segment: int
    count: int

    def to_wire(self) -> list[Any]:
        return [self.receiver, self.receiver_boot, self.model, self.segment, self.count]


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(WireMessage):
    """Liveness and queue state on ``state/{role}/{node}``; the will sends ``online=False``.

    ``boot`` identifies the run of the process (credits are per run). ``flops_per_s`` is the
    node's measured speed, ``link_bps``/``link_rtt_s`` its outgoing link as far as it knows it
    (0: unknown), ``paths`` the bytes/s it receives from each sender as measured (the path
    from that sender, :class:`offramp.policy.links.PathMeter`), ``loadable``/``max_segments``
    what the scheduler may ask it to host.
    ``device`` is what a worker's segments run on (``cpu``, ``cuda``, ``tensorrt``; empty when
    unknown), as ONNX Runtime gave it, which may differ from what it was asked for.
    ``draining``: the service is stopping; it advertises no segment and grants no credit, and
    senders stop sending to it at once (it still finishes what it holds).
    ``queue_s``: how long what the node had published and the network had not yet taken needs
    to go out at its link's rate, when it sent this: the next heartbeat waits behind it, so
    the others wait that much longer before they call the node silent.
    ``bundle``: the model bundle the service serves, as ``name@digest``
    (:attr:`offramp.model.bundle.Bundle.identity`; empty when it serves none or does not say).
    An admission-controller's: ``group``, its ingest group; ``active_since``, when it took the
    ingest session (Unix seconds, 0: standing by); ``arrivals``, frames received per source
    since it was tracked, for its most active sources only (the scheduler plans for them).
    """

    KIND: ClassVar[str] = "hb"
    role: str
    node: str
    online: bool = True
    seq: int = 0
    ts: float = 0.0
    segments: tuple[SegmentLoad, ...] = ()
    flops_per_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    boot: float = 0.0
    wants: tuple[Want, ...] = ()
    sent: tuple[SentCount, ...] = ()
    link_bps: float = 0.0
    link_rtt_s: float = 0.0
    loadable: tuple[SegmentRef, ...] = ()
    max_segments: int = 0
    device: str = ""
    draining: bool = False
    paths: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0
    bundle: str = ""
    group: str = ""
    active_since: float = 0.0
    arrivals: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"role": self.role, "node": self.node, "online": self.online, "seq": self.seq,
                "ts": self.ts, "segments": [s.to_wire() for s in self.segments],
                "flops": self.flops_per_s, "stats": self.stats, "boot": self.boot,
                "wants": [w.to_wire() for w in self.wants],
                "sent": [c.to_wire() for c in self.sent], "link_bps": self.link_bps,
                "link_rtt": self.link_rtt_s,
                "loadable": [[s.model, s.segment] for s in self.loadable],
                "max_segs": self.max_segments, "device": self.device,
                "draining": self.draining, "paths": self.paths, "queue_s": self.queue_s,
                **({"bundle": self.bundle} if self.bundle else {}),
                **({"group": self.group} if self.group else {}),
                **({"active": self.active_since} if self.active_since else {}),
                **({"arrivals": self.arrivals} if self.arrivals else {})}

    @classmethod
    def from_wire(cls, r: Reader) -> Heartbeat:
        stats = r.map("stats")
        wants = tuple(Want(model=row[0].text("_"), segment=row[1].integer("_"),
                           priority=row[2].number("_"), count=row[3].integer("_"))
                      for row in r.rows("wants", 4))
        sent = tuple(SentCount(receiver=row[0].text("_"), receiver_boot=row[1].number("_"),
                               model=row[2].text("_"), segment=row[3].integer("_"),
                               count=row[4].integer("_"))
                     for row in r.rows("sent", 5))
        loadable = tuple(SegmentRef(model=row[0].text("_"), segment=row[1].integer("_"))
                         for row in r.rows("loadable", 2))
        paths = r.opt_map("paths")
        arrivals = r.opt_map("arrivals")
        return cls(role=r.text("role"), node=r.text("node"), online=r.flag("online"),
                   seq=r.integer("seq"), ts=r.number("ts"),
                   segments=tuple(SegmentLoad.from_wire(s) for s in r.maps("segments")),
                   flops_per_s=r.number("flops"), stats={k: stats.number(k) for k in stats},
                   boot=r.number("boot"), wants=wants, sent=sent, link_bps=r.number("link_bps"),
                   link_rtt_s=r.number("link_rtt"), loadable=loadable,
                   max_segments=r.integer("max_segs"),
                   device=r.opt_text("device") or "",
                   draining=r.flag("draining") if r.has("draining") else False,
                   paths={k: paths.number(k) for k in paths} if paths is not None else {},
                   queue_s=r.number("queue_s") if r.has("queue_s") else 0.0,
                   bundle=r.opt_text("bundle") or "", group=r.opt_text("group") or "",
                   active_since=r.number("active") if r.has("active") else 0.0,
                   arrivals={k: arrivals.number(k) for k in arrivals}
                   if arrivals is not None else {})
