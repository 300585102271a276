"""Calibration of exits on held-out data, and threshold selection (docs/algorithms.md 1.2).

A :class:`Calibration` holds, for every validation sample and exit, each criterion's score and
whether that exit's prediction is right, plus the cost of reaching each exit. From these it
simulates the cascade exactly for any thresholds, so a running system (the exit-arbiter) moves
along the curves without new data. Thresholds for exits 1..K-1 (exit K always exits);
:data:`NEVER` means "this exit never takes a sample".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.policy.scores import CRITERIA

NEVER = 2.0
# Standard errors by which chosen thresholds clear a target on the validation set (see
# Calibration.meets); 1.645 is a one-sided 95% bound. On the mnv2-digits bench model (359
# validation samples), "final - 1 point" realised final - 3.6 points on the test split with no
# margin, final - 1.9 with z = 1, and final - 0.6 with this one.
DEFAULT_MARGIN_Z = 1.645


@dataclass(frozen=True)
class Outcome:
    """What thresholds do on the validation set."""

    accuracy: float
    shares: tuple[float, ...]
    flops_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 5), "shares": [round(s, 5) for s in self.shares],
                "flops_fraction": round(self.flops_fraction, 5)}


class Calibration:
    """Per-sample validation scores (N, K) per criterion, correctness (N, K), and costs (K,)."""

    def __init__(self, scores: dict[str, np.ndarray], correct: np.ndarray, cost: np.ndarray,
                 labels_confidence: np.ndarray | None = None) -> None:
        if correct.ndim != 2 or correct.shape[1] < 1:
            raise ValueError(f"correct must be (N, K), got {correct.shape}")
        for name, s in scores.items():
            if name not in CRITERIA:
                raise ValueError(f"unknown criterion {name!r}")
            if s.shape != correct.shape:
                raise ValueError(f"{name} scores {s.shape} do not match correct {correct.shape}")
        if cost.shape != (correct.shape[1],):
            raise ValueError(f"cost must have one entry per exit, got {cost.shape}")
        self.scores = {k: v.astype(np.float32) for k, v in scores.items()}
        self.correct = correct.astype(bool)
        self.cost = cost.astype(np.float64)

    @property
    def num_exits(self) -> int:
        return int(self.correct.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.correct.shape[0])

    def exit_accuracy(self) -> list[float]:
        return [float(a) for a in self.correct.mean(axis=0)]

    # -- the cascade --------------------------------------------------------------------------
    def exit_index(self, criterion: str, thresholds: tuple[float, ...] | list[float]) -> np.ndarray:
        """0-based exit each validation sample takes under ``thresholds``."""
        k = self.num_exits
        if len(thresholds) != k - 1:
            raise ValueError(f"need {k - 1} thresholds for {k} exits, got {len(thresholds)}")
        s = self.scores[criterion][:, : k - 1]
        take = s >= np.asarray(thresholds, np.float32)[None, :]
        take = np.concatenate([take, np.ones((s.shape[0], 1), bool)], axis=1)
        out: np.ndarray = take.argmax(axis=1)
        return out

    def _cascade(self, criterion: str, thresholds: tuple[float, ...] | list[float]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The exit each validation sample takes, and whether it is right there."""
        idx = self.exit_index(criterion, thresholds)
        return idx, self.correct[np.arange(self.num_samples), idx]

    def simulate(self, criterion: str, thresholds: tuple[float, ...] | list[float]) -> Outcome:
        idx, right = self._cascade(criterion, thresholds)
        accuracy = float(right.mean())
        shares = np.bincount(idx, minlength=self.num_exits) / max(1, self.num_samples)
        return Outcome(accuracy, tuple(float(x) for x in shares), float(self.cost[idx].mean()))

    def accuracy_at_exits(self, criterion: str, thresholds: tuple[float, ...] | list[float]
                          ) -> list[float]:
        """Accuracy of the validation samples that take each exit under ``thresholds``
        (NaN where none does): what a realised exit share implies."""
        idx, right = self._cascade(criterion, thresholds)
        return [float(right[idx == k].mean()) if np.any(idx == k) else float("nan")
                for k in range(self.num_exits)]

    # -- threshold selection --------------------------------------------------------------------
    def _candidates(self, criterion: str, k: int) -> np.ndarray:
        values = np.unique(self.scores[criterion][:, k])
        return np.concatenate([values, [NEVER]])

    def meets(self, criterion: str, thresholds: tuple[float, ...] | list[float], target: float,
              margin_z: float = 0.0) -> bool:
        """Whether ``thresholds`` keep the cascade's accuracy at ``target`` or above, with a
        margin of ``margin_z`` standard errors of the accuracy the exits give up (per sample:
        the final exit's correctness minus the cascade's, a paired difference, zero when every
        sample runs to the end). Thresholds that only just meet a target on a few hundred
        validation samples miss it on new data: the smallest such threshold sits where the
        validation errors happen to run out."""
        _, right = self._cascade(criterion, thresholds)
        accuracy = float(right.mean())
        if margin_z <= 0 or self.num_samples < 2:
            return accuracy >= target
        given_up = self.correct[:, -1].astype(np.float64) - right
        stderr = float(given_up.std(ddof=1)) / np.sqrt(self.num_samples)
        return bool(accuracy - margin_z * stderr >= target)

    def thresholds_for_accuracy(self, criterion: str, target: float,
                                margin_z: float = DEFAULT_MARGIN_Z) -> tuple[float, ...]:
        """Greedy from the first exit: the smallest threshold at each exit whose cascade
        accuracy (later exits closed) meets ``target`` with the margin (:meth:`meets`)."""
        thr = [NEVER] * (self.num_exits - 1)
        for k in range(self.num_exits - 1):
            for t in self._candidates(criterion, k):
                thr[k] = float(t)
                if self.meets(criterion, thr, target, margin_z):
                    break
            else:
                thr[k] = NEVER
        return tuple(thr)

    def thresholds_for_budget(self, criterion: str, flops_fraction: float
                              ) -> tuple[float, ...]:
        """The best-accuracy thresholds whose mean cost is <= ``flops_fraction`` of the full
        model: a search over one shared threshold, then each exit raised greedily."""
        best: tuple[float, tuple[float, ...]] | None = None
        for t in np.linspace(0.0, 1.0, 201):
            thr = tuple([float(t)] * (self.num_exits - 1))
            out = self.simulate(criterion, thr)
            if out.flops_fraction <= flops_fraction and (best is None or out.accuracy > best[0]):
                best = (out.accuracy, thr)
        if best is None:
            return tuple([0.0] * (self.num_exits - 1))
        acc, thr_best = best
        current = list(thr_best)
        for k in range(self.num_exits - 1):
            for t in self._candidates(criterion, k):
                if t <= current[k]:
                    continue
                trial = [*current[:k], float(t), *current[k + 1:]]
                out = self.simulate(criterion, trial)
                if out.flops_fraction <= flops_fraction and out.accuracy > acc:
                    acc, current = out.accuracy, trial
        return tuple(current)

    # -- curves and calibration error ---------------------------------------------------------
    def curves(self, criterion: str, points: int = 21) -> list[dict[str, list[float]]]:
        """Per exit: thresholds, accuracy of the samples that would exit there, share exiting."""
        out = []
        grid = np.linspace(0.0, 1.0, points)
        for k in range(self.num_exits):
            s, c = self.scores[criterion][:, k], self.correct[:, k]
            acc, share = [], []
            for t in grid:
                m = s >= t
                share.append(round(float(m.mean()), 4))
                acc.append(round(float(c[m].mean()), 4) if m.any() else 1.0)
            out.append({"threshold": [round(float(g), 4) for g in grid], "accuracy": acc,
                        "share": share})
        return out

    def ece(self, bins: int = 15) -> list[float]:
        """Expected calibration error of each exit's softmax confidence."""
        conf = self.scores["confidence"]
        result = []
        edges = np.linspace(0.0, 1.0, bins + 1)
        for k in range(self.num_exits):
            err = 0.0
            for lo, hi in itertools.pairwise(edges):
                m = (conf[:, k] > lo) & (conf[:, k] <= hi)
                if m.any():
                    err += m.mean() * abs(conf[m, k].mean() - self.correct[m, k].mean())
            result.append(round(float(err), 5))
        return result

    # -- storage ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.num_samples,
            "cost": [round(float(c), 6) for c in self.cost],
            "exit_accuracy": [round(a, 5) for a in self.exit_accuracy()],
            "ece": self.ece(),
            "correct": self.correct.astype(int).tolist(),
            "scores": {k: np.round(v, 5).tolist() for k, v in self.scores.items()},
            "curves": {k: self.curves(k) for k in self.scores},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls({k: np.asarray(v, np.float32) for k, v in d["scores"].items()},
                   np.asarray(d["correct"], bool), np.asarray(d["cost"], np.float64))
