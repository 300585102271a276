"""Data admission at the source (docs/algorithms.md 1.4), pure and clock-free.

``rate`` (arrival-rate adaptation, NUM-style with log utility): every tick the admitted rate of
a source follows ``lambda <- (1-eta) lambda + eta min(lambda_max, V / max(Q_path, eps))``; a token
bucket at that rate decides each frame. ``threshold`` (exit-threshold adaptation): the rate is
kept and the exit thresholds follow the backlog,
``T_k <- clip(T_k - eps_T (Q_path - Q_ref), T_min_k, T_max_k)``.

Q_path is the backlog along the source's path: for each segment, the smallest backlog (in
seconds, counting only work of the source's priority or higher) among the live hosts of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from offramp.settings import setting

Strategy = Literal["none", "rate", "threshold"]
SCORE_MAX = 1.0  # every exit criterion scores in [0, 1] (offramp.policy.scores)


@dataclass(frozen=True)
class ControlSettings:
    """The admission strategy and its constants (variables OFFRAMP_CONTROL_*), read by the
    admission-controller (rate) and the exit-arbiter (threshold)."""

    strategy: Strategy = setting(
        "none", "none (admit up to the in-flight bound), rate (adapt each source's admitted "
        "rate to its path backlog) or threshold (keep the rate, adapt exit thresholds)")
    v: float = setting(10.0, "V of rate adaptation: the admitted rate settles where "
                       "rate x path backlog = V (frames)", min=1e-6, max=1e9)
    eta: float = setting(0.2, "eta: smoothing of rate adaptation per tick", min=1e-6, max=1)
    eps_s: float = setting(0.005, "eps: smallest path backlog used, seconds", min=1e-6, max=60)
    rate_max: float = setting(2000.0, "lambda_max: highest admitted rate per source, frames/s",
                              min=0.1, max=1e9)
    burst_s: float = setting(0.05, "Token bucket depth, in seconds of the admitted rate",
                             min=0.001, max=60)
    buffer: int = setting(0, "Frames over the admitted rate wait in a buffer of this size per "
                          "source (0: answered 'dropped' at once)", min=0, max=100_000)
    eps_t: float = setting(0.5, "eps_T: threshold step per second of backlog above Q_ref",
                           min=0, max=1e6)
    q_ref_s: float = setting(0.05, "Q_ref: path backlog the threshold adaptation aims for, s",
                             min=0, max=3600)
    accuracy_floor: float = setting(-1.0, "A_min: thresholds never fall below those keeping "
                                    "this accuracy; < 0: final-exit accuracy - 0.05", min=-1,
                                    max=1)
    tick_s: float = setting(0.1, "Control period, seconds", min=0.01, max=60)


def path_backlog(per_segment: Sequence[Sequence[float]]) -> float:
    """Sum over segments of the least-backlogged host's backlog; a segment with no host
    counts as 0 (the dispatcher keeps such work back and it is seen there)."""
    return sum(min(hosts) for hosts in per_segment if hosts)


class RateController:
    def __init__(self, s: ControlSettings, initial: float | None = None) -> None:
        self.s = s
        self.rate = s.rate_max if initial is None else initial

    def update(self, q_path_s: float) -> float:
        target = min(self.s.rate_max, self.s.v / max(q_path_s, self.s.eps_s))
        self.rate = (1 - self.s.eta) * self.rate + self.s.eta * target
        return self.rate


class TokenBucket:
    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self._tokens = max(1.0, rate * burst_s)
        self._at = now

    def _refill(self, now: float) -> None:
        depth = max(1.0, self.rate * self.burst_s)
        self._tokens = min(depth, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def adapt_thresholds(current: Sequence[float], q_path_s: float, s: ControlSettings,
                     floor: Sequence[float], ceiling: Sequence[float], dt_s: float
                     ) -> tuple[float, ...]:
    """One step of exit-threshold adaptation over ``dt_s`` seconds.

    Exit scores lie in [0, 1], so every threshold above 1 closes its exit alike (a closed
    ceiling is 2). Stepping down from such a threshold therefore starts at 1, and a threshold
    that rises above 1 goes straight to its ceiling: otherwise the controller would spend
    seconds of overload walking from 2 to 1 through thresholds that all mean "closed"."""
    step = s.eps_t * (q_path_s - s.q_ref_s) * dt_s
    out = []
    for t, lo, hi in zip(current, floor, ceiling, strict=True):
        new = min(t, SCORE_MAX) - step
        out.append(hi if new > SCORE_MAX else min(max(new, lo), hi))
    return tuple(out)
