"""Per-sample exit decisions inside a batch (docs/algorithms.md 1.1, 2.2, 2.3).

After segment k a sample exits when its score (:mod:`offramp.policy.scores`) is >= T_k; the last exit
always exits. The QoS rule: a sample with a deadline that would miss it by going on (now +
estimated time to the next exit > deadline) exits now with exit k's answer, reason
``deadline``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offramp.policy.scores import score, softmax


@dataclass(frozen=True)
class Deadlines:
    """The QoS rule's inputs: each sample's deadline (absolute, NaN where it has none), the
    time now, and the expected time to the next exit."""

    at: np.ndarray
    now: float
    to_next_s: float = 0.0


@dataclass(frozen=True)
class ExitDecision:
    exits: np.ndarray  # (N,) bool
    reasons: list[str]  # per sample: threshold / final / deadline / feature-difference / ""
    labels: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float, max softmax probability


def decide(criterion: str, threshold: float | None, logits: np.ndarray,
           embedding: np.ndarray | None = None, previous: np.ndarray | None = None, *,
           last: bool = False, deadlines: Deadlines | None = None) -> ExitDecision:
    """Decide for each row of ``logits``. ``threshold`` None means exits are closed here."""
    n = logits.shape[0]
    probs = softmax(logits.astype(np.float32))
    labels = probs.argmax(axis=-1)
    confidence = probs.max(axis=-1)
    if last:
        return ExitDecision(np.ones(n, bool), ["final"] * n, labels, confidence)
    exits = np.zeros(n, bool)
    if threshold is not None:
        exits = score(criterion, logits, embedding, previous) >= threshold
    reasons = [("feature-difference" if criterion == "feature-difference" else "threshold")
               if e else "" for e in exits]
    if deadlines is not None:
        at = deadlines.at
        late = ~exits & ~np.isnan(at) & (deadlines.now + deadlines.to_next_s > at)
        for i in np.flatnonzero(late):
            reasons[i] = "deadline"
        exits = exits | late
    return ExitDecision(exits, reasons, labels, confidence)
