"""Which admission-controller of a group takes the frames (pure: heartbeats and the clock in).

The frames of a group (``OFFRAMP_ADMISSION_GROUP``) come through one MQTT session, whose
client id is the group's: whoever connects with it gets the frames, and the broker hands it
every frame the last holder received and did not acknowledge. So exactly one member should
hold it. Each member says in its heartbeat whether it is active and since when
(``active_since``); a member takes the session when no other member has been heard
active for ``wait_s`` (a standby waits longer than a primary, so that at a cold start the
primary wins, and a restarted primary finds its standby active and stands by in its turn).
A member not heard from for ``stale_s``, or whose will said it is gone, is not active. An
active member that sees another one active since later (it took over while this one was cut
off) gives the session up; between two that claimed together, the lower node name keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from offramp.wire import Heartbeat


@dataclass
class _Peer:
    seen: float
    active_since: float  # 0: standing by
    online: bool


class Leadership:
    def __init__(self, node: str, *, wait_s: float, stale_s: float, started: float) -> None:
        self.node = node
        self.wait_s = wait_s
        self.stale_s = stale_s
        self.active_since = 0.0  # 0: standing by
        self._peers: dict[str, _Peer] = {}
        self._last_active = started  # when another member was last heard active (or start)

    @property
    def active(self) -> bool:
        return self.active_since > 0

    def observe(self, hb: Heartbeat, now: float) -> None:
        """A heartbeat of another member of the group (role admission)."""
        if hb.node == self.node:
            return
        since = hb.active_since if hb.online else 0.0
        self._peers[hb.node] = _Peer(now, since, hb.online)
        if since > 0:
            self._last_active = max(self._last_active, now)

    def _active_peers(self, now: float) -> dict[str, float]:
        return {n: p.active_since for n, p in self._peers.items()
                if p.online and p.active_since > 0 and now - p.seen <= self.stale_s}

    def step(self, now: float, wall: float) -> str | None:
        """``take`` (connect to the session now), ``give`` (leave it now), or None."""
        others = self._active_peers(now)
        if not self.active:
            if not others and now - self._last_active >= self.wait_s:
                self.active_since = wall
                return "take"
            return None
        for node, since in others.items():
            if since > self.active_since or (since == self.active_since and node < self.node):
                self.active_since = 0.0
                return "give"
        return None

    def standby_alive(self, now: float) -> bool:
        """Whether another member is there to take the session over if this one leaves."""
        return any(p.online and now - p.seen <= self.stale_s for p in self._peers.values())
