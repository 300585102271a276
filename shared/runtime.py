"""ONNX Runtime sessions for segments (serving side; never imports torch).

Provider choice: ``cpu`` always works; ``cuda`` and ``tensorrt`` are used when asked for *and*
available in the installed onnxruntime build (``onnxruntime-gpu``), otherwise the runner falls
back to CPU and says so in ``providers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from offramp.bundle import Bundle, BundleError, SegmentSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def make_session(path: Path, *, device: str = "cpu", threads: int = 1,
                 spin: bool = False) -> ort.InferenceSession:
    """An inference session on the best available of the requested providers.

    Intra-op threads do not spin-wait by default: a worker hosts several segment sessions, and
    on a small CPU each session's spinning threads steal the cores the next one needs.
    """
    wanted = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}
    if device not in wanted:
        raise BundleError(f"device {device!r} is not one of {', '.join(wanted)}")
    available = set(ort.get_available_providers())
    providers = [PROVIDERS[d] for d in wanted[device] if PROVIDERS[d] in available]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise BundleError(f"cannot load {path}: {exc}") from None


@dataclass(frozen=True)
class SegmentOutput:
    activation: np.ndarray | None
    logits: np.ndarray
    embedding: np.ndarray


class SegmentRunner:
    """Runs one segment of a bundle on a batch. Thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, bundle: Bundle, index: int, *, device: str = "cpu", threads: int = 1):
        self.spec: SegmentSpec = bundle.segment(index)
        self.index = index
        self.session = make_session(bundle.path(self.spec.file), device=device, threads=threads)
        self.providers = self.session.get_providers()
        names = [self.spec.logits.name, self.spec.embedding.name]
        if self.spec.activation is not None:
            names.insert(0, self.spec.activation.name)
        self._outputs = names

    def run(self, x: np.ndarray) -> SegmentOutput:
        if x.shape[1:] != self.spec.input.per_sample:
            raise BundleError(f"segment {self.index} takes {list(self.spec.input.per_sample)} "
                              f"per sample, got {list(x.shape[1:])}")
        out = self.session.run(self._outputs, {self.spec.input.name: x.astype(np.float32,
                                                                               copy=False)})
        if self.spec.activation is None:
            return SegmentOutput(None, out[0], out[1])
        return SegmentOutput(out[0], out[1], out[2])


class FullModelRunner:
    """The monolithic exported model (input to final logits): the baseline for benchmarks."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 1) -> None:
        self.session = make_session(bundle.path(bundle.manifest.full_model), device=device,
                                    threads=threads)
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self._input: x.astype(np.float32, copy=False)})[0]
        return out
