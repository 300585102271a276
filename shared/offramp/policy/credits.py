"""No herding (docs/algorithms.md 3.3): credit-based admission of offloaded work, pure and clock-free.

A receiver (a worker hosting a segment) never lets queued work plus the credit it has handed out
exceed its bound ``B``:

    queued + sum over senders (limit_s - received_s) <= B

``limit_s`` is a *cumulative* count of samples sender ``s`` may have sent since its boot; it
only grows, so an old heartbeat can never grant more than a newer one, and a sender that sees
several heartbeats simply uses the largest limit. Each grant round shares the free room
``B - queued - outstanding`` among the senders that want to send, highest priority first, each
up to what it asked for and at most ``B / senders`` outstanding (so one sender cannot hold all
the room). A sample that arrives on credit moves from "outstanding" to "queued",
so the sum never grows by arrivals; it grows only by grants, which are capped by the free room.
Hence N senders that all see the same idle node together send it at most ``B`` samples.

Credit spent on a packet that never arrives (lost with a broker restart) would shrink the room
for ever. Senders therefore report their cumulative sent counts in their heartbeats; a count
reported more than ``lease_s`` ago that still exceeds what arrived was lost, and the receiver
writes it off. A sender that goes offline gives all its credit back. The queue's own hard bound
stays behind all this as a second line.

Grants travel in heartbeats. A receiver whose queue has room again for a waiting sender sends
its heartbeat early (:meth:`CreditLedger.due`), and so does a sender with more work waiting than
it last asked for (:meth:`Demand.untold`): credit comes back as work leaves a queue, not once a
period, so ``B`` can be a few micro-batches. That bounds how far a stage runs ahead of the next
one, which on shared cores is CPU the slower stage does not get, and work left for it alone at
the end.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from offramp.wire import Grant, SentCount

K = TypeVar("K", bound=Hashable)


@dataclass
class _Account:
    boot: float
    received: int = 0
    limit: int = 0
    reports: list[tuple[float, int]] = field(default_factory=list)  # (when, sent so far)

    @property
    def outstanding(self) -> int:
        return max(0, self.limit - self.received)


@dataclass(frozen=True)
class Request:
    """What a sender asked for in its heartbeat: ``count`` samples of ``priority``."""

    sender: str
    boot: float
    priority: float
    count: int


class CreditLedger:
    """Receiver side, one per hosted segment."""

    def __init__(self, bound: int, lease_s: float = 2.0) -> None:
        self.bound = bound
        self.lease_s = lease_s
        self._accounts: dict[str, _Account] = {}

    def _account(self, sender: str, boot: float, now: float) -> _Account | None:
        acc = self._accounts.get(sender)
        if acc is None or boot > acc.boot:  # first contact, or the sender restarted
            acc = self._accounts[sender] = _Account(boot)
        return acc if acc.boot == boot else None  # an older run of the sender: not accounted

    def _peek(self, sender: str, boot: float) -> _Account | None:
        """The account :meth:`_account` would give, without creating or resetting one."""
        acc = self._accounts.get(sender)
        if acc is None or boot > acc.boot:
            return _Account(boot)
        return acc if acc.boot == boot else None

    def received(self, sender: str, boot: float, count: int, now: float) -> bool:
        """Account for ``count`` samples that arrived on credit. False if they were sent
        without credit (the hard queue bound then decides)."""
        acc = self._account(sender, boot, now)
        if acc is None:
            return False
        within = acc.received + count <= acc.limit
        acc.received += count
        return within

    def reported(self, sender: str, boot: float, sent: int, now: float) -> None:
        """The sender says it has sent ``sent`` samples here so far (from its heartbeat)."""
        acc = self._account(sender, boot, now)
        if acc is not None and sent > acc.received:
            acc.reports.append((now, sent))

    def outstanding(self) -> int:
        return sum(a.outstanding for a in self._accounts.values())

    def forget(self, sender: str) -> None:
        """The sender is gone (will message): its unused credit returns to the pool."""
        self._accounts.pop(sender, None)

    def grant(self, queued: int, requests: Iterable[Request], now: float) -> dict[str, Grant]:
        """One grant round: returns every sender's current cumulative grant."""
        for acc in self._accounts.values():
            while acc.reports and now - acc.reports[0][0] > self.lease_s:
                _, sent = acc.reports.pop(0)
                acc.received = max(acc.received, sent)  # what never arrived was lost
            acc.reports = acc.reports[-8:]
        for account, give, _ in self._round(queued, requests, now):
            account.limit += give
        return {s: Grant(boot=a.boot, limit=a.limit) for s, a in self._accounts.items()}

    def due(self, queued: int, requests: Iterable[Request], batch: int) -> bool:
        """Whether a sender has less than a micro-batch (``batch`` samples) of credit left and
        a grant round now would give it a micro-batch, or all it asks for: worth an early
        heartbeat rather than waiting for the next one."""
        return any(give > 0 and min(batch, short) <= give and account.outstanding < batch
                   for account, give, short in self._round(queued, requests, None))

    def _round(self, queued: int, requests: Iterable[Request], now: float | None
               ) -> list[tuple[_Account, int, int]]:
        """(account, samples to give, samples it is short of) per request, highest priority
        first, within the free room. With ``now``, a sender seen for the first time (or
        restarted) gets its account; without, it is planned on a blank one."""
        free = self.bound - queued - self.outstanding()
        requests = sorted(requests, key=lambda r: (-r.priority, r.sender))
        share = max(1, self.bound // max(1, len({r.sender for r in requests})))
        out = []
        for req in requests:
            account = (self._account(req.sender, req.boot, now) if now is not None  # notes a restart
                       else self._peek(req.sender, req.boot))
            if account is None:
                continue
            short = max(0, min(req.count, share) - account.outstanding)
            give = min(max(0, free), short)
            free -= give
            out.append((account, give, short))
        return out


class Demand(Generic[K]):
    """Sender side: what to ask each receiver for in a heartbeat (``wants``): two heartbeat
    periods of the measured flow, to keep credit ahead of it, plus what waits for credit now.

    The flow is measured over windows of at least half a period, so heartbeats sent early
    (:meth:`CreditLedger.due`) neither shrink nor repeat the demand. :meth:`untold` says when
    more waits than the last heartbeat asked for: then this sender's heartbeat is worth
    sending early too.
    """

    def __init__(self, period_s: float, start: float) -> None:
        self.period_s = period_s
        self._count: Counter[K] = Counter()
        self._since = start
        self._rate: dict[K, float] = {}
        self._told: dict[K, int] = {}

    def add(self, key: K, count: int = 1) -> None:
        self._count[key] += count

    def wants(self, waiting: Mapping[K, int], now: float) -> dict[K, int]:
        elapsed = now - self._since
        if elapsed >= self.period_s / 2:
            self._rate = {k: n / elapsed for k, n in self._count.items()}
            self._count.clear()
            self._since = now
        asked = {k: math.ceil(2 * self.period_s * r) for k, r in self._rate.items()}
        for k, n in waiting.items():
            asked[k] = asked.get(k, 0) + n
        self._told = {k: n for k, n in asked.items() if n > 0}
        return self._told

    def untold(self, key: K, waiting: int) -> bool:
        return waiting > self._told.get(key, 0)


class SendWindow:
    """Sender side: how many samples this node may still send to each receiver's segment."""

    def __init__(self, node: str, boot: float) -> None:
        self.node = node
        self.boot = boot
        self._sent: dict[tuple[str, str, int], tuple[float, int]] = {}

    def available(self, receiver: str, receiver_boot: float, model: str, segment: int,
                  grant: Grant | None) -> int:
        if grant is None or grant.boot != self.boot:
            return 0
        boot, sent = self._sent.get((receiver, model, segment), (receiver_boot, 0))
        if boot != receiver_boot:  # the receiver restarted: its ledger starts from zero
            sent = 0
        return max(0, grant.limit - sent)

    def spend(self, receiver: str, receiver_boot: float, model: str, segment: int,
              count: int) -> None:
        boot, sent = self._sent.get((receiver, model, segment), (receiver_boot, 0))
        if boot != receiver_boot:
            sent = 0
        self._sent[(receiver, model, segment)] = (receiver_boot, sent + count)

    def forget(self, receiver: str) -> None:
        for key in [k for k in self._sent if k[0] == receiver]:
            del self._sent[key]

    def report(self) -> tuple[SentCount, ...]:
        """Cumulative sent counts, for this node's heartbeat."""
        return tuple(SentCount(receiver=r, receiver_boot=boot, model=m, segment=s,
                               count=n) for (r, m, s), (boot, n) in self._sent.items())
