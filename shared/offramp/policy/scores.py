"""Exit scores, one definition for calibration, the exit-arbiter and the segment-workers.

Every criterion maps to a score in [0, 1] where higher means "safe to stop here", so that one
rule serves all of them: a sample exits at exit k when ``score >= T_k`` (docs/algorithms.md 1.1, 2.2).

- confidence: the maximum softmax probability.
- entropy: ``1 - H(p) / log(C)``, the normalised entropy turned around.
- margin: top-1 minus top-2 probability.
- feature-difference: ``1 - ||z_k - z_{k-1}|| / 2`` for L2-normalised embeddings (distance 0 is
  score 1, opposite vectors score 0); a threshold T corresponds to DistrEE's delta = 2 (1 - T).
  The first exit has no previous embedding and scores 0 (it never exits on this criterion).
"""

from __future__ import annotations

import numpy as np

CRITERIA = ("confidence", "entropy", "margin", "feature-difference")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    out: np.ndarray = x / np.maximum(norm, 1e-12)
    return out


def score(criterion: str, logits: np.ndarray, embedding: np.ndarray | None = None,
          previous: np.ndarray | None = None) -> np.ndarray:
    """Per-sample exit score in [0, 1] for a batch of ``logits`` (N, C)."""
    if criterion == "feature-difference":
        if embedding is None or previous is None:
            return np.zeros(logits.shape[0], np.float32)
        dist = np.linalg.norm(l2_normalise(embedding) - l2_normalise(previous), axis=-1)
        fd: np.ndarray = np.clip(1.0 - dist / 2.0, 0.0, 1.0).astype(np.float32)
        return fd
    p = softmax(logits.astype(np.float32))
    out: np.ndarray
    if criterion == "confidence":
        out = p.max(axis=-1)
    elif criterion == "entropy":
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)
        out = np.clip(1.0 - h / np.log(p.shape[-1]), 0.0, 1.0).astype(np.float32)
    elif criterion == "margin":
        top2 = np.sort(p, axis=-1)[:, -2:]
        out = (top2[:, 1] - top2[:, 0]).astype(np.float32)
    else:
        raise ValueError(f"unknown exit criterion {criterion!r}; one of {', '.join(CRITERIA)}")
    return out
