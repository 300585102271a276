"""Calibrating a bundle on a validation split with ONNX Runtime (the same code path as serving)."""

from __future__ import annotations

import numpy as np

from offramp.ml.data import Split
from offramp.model.bundle import Bundle
from offramp.model.calibration import Calibration
from offramp.model.inputs import normalise
from offramp.model.sessions import SegmentRunner
from offramp.policy.scores import CRITERIA, score


def chain_outputs(bundle: Bundle, x: np.ndarray, batch: int = 128
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits and embeddings of every exit for every sample (no early exit)."""
    runners = [SegmentRunner(bundle, s.index, threads=0) for s in bundle.manifest.segments]
    logits: list[list[np.ndarray]] = [[] for _ in runners]
    embs: list[list[np.ndarray]] = [[] for _ in runners]
    for start in range(0, len(x), batch):
        h = x[start:start + batch]
        for k, runner in enumerate(runners):
            out = runner.run(h)
            logits[k].append(out.logits)
            embs[k].append(out.embedding)
            if out.activation is not None:
                h = out.activation
    return [np.concatenate(v) for v in logits], [np.concatenate(v) for v in embs]


def measure(bundle: Bundle, split: Split) -> Calibration:
    """Per-exit scores for every criterion and correctness on ``split`` (not stored)."""
    x = normalise(split.images, bundle.manifest.input)
    logits, embs = chain_outputs(bundle, x)
    k = len(logits)
    correct = np.stack([lg.argmax(-1) == split.labels for lg in logits], axis=1)
    scores = {}
    for crit in CRITERIA:
        cols = [score(crit, logits[i], embs[i], embs[i - 1] if i > 0 else None)
                for i in range(k)]
        scores[crit] = np.stack(cols, axis=1)
    seg_flops = np.asarray([s.flops for s in bundle.manifest.segments], np.float64)
    cost = np.cumsum(seg_flops) / float(bundle.manifest.full_flops)
    return Calibration(scores, correct, cost)


def calibrate_bundle(bundle: Bundle, split: Split) -> Calibration:
    """Calibrate on ``split`` (the validation split) and store it in the bundle."""
    calib = measure(bundle, split)
    bundle.manifest.calibration = calib.to_dict()
    bundle.save()
    return calib
