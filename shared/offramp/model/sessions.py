"""ONNX Runtime sessions for segments (serving side; never imports torch).

Provider choice: ``cpu`` always works; ``cuda`` and ``tensorrt`` are used when asked for *and*
available in the installed onnxruntime build (``onnxruntime-gpu``), otherwise the runner falls
back to CPU and says so in ``providers`` and ``device``. onnxruntime-gpu also falls back on its
own when the CUDA libraries it was built for cannot be loaded (PyPI's 1.27 and later need CUDA
13, 1.26 and earlier CUDA 12); ``device`` is read from the session, so it tells that too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from offramp.model.bundle import Bundle, BundleError, SegmentSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
DEVICES = {provider: device for device, provider in PROVIDERS.items()}


def installed_providers() -> list[str]:
    """The execution providers the installed onnxruntime build has (not whether a GPU and the
    CUDA libraries are there: a session tells that, see ``SegmentRunner.device``)."""
    providers: list[str] = ort.get_available_providers()
    return providers


def cuda_available() -> bool:
    """Whether the installed onnxruntime build has the CUDA execution provider."""
    return PROVIDERS["cuda"] in installed_providers()


def make_session(path: Path, *, device: str = "cpu", threads: int = 1,
                 spin: bool = False) -> ort.InferenceSession:
    """An inference session on the best available of the requested providers.

    Intra-op threads do not spin-wait by default: a worker hosts several segment sessions, and
    on a small CPU each session's spinning threads steal the cores the next one needs.
    """
    wanted = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}
    if device not in wanted:
        raise BundleError(f"device {device!r} is not one of {', '.join(wanted)}")
    available = set(installed_providers())
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
    """Runs one segment of a bundle on a batch. Thread-safe (ONNX Runtime sessions are).

    ``static_batch`` > 0 runs every batch at exactly that many samples: padded with zero rows,
    or split, and the real rows' answers given back. GPU workers set it to their largest
    micro-batch. On an H100, onnxruntime-gpu 1.31 took 130 to 750 ms per segment whenever a
    session's batch size changed, even back to a size it had run before (cuDNN plans kernels
    per shape), against about 1 ms for the run itself: micro-batches of varying size would pay
    that on most batches. Samples do not interact in these models, so padding changes no answer.
    """

    def __init__(self, bundle: Bundle, index: int, *, device: str = "cpu", threads: int = 1):
        self.spec: SegmentSpec = bundle.segment(index)
        self.index = index
        self.session = make_session(bundle.path(self.spec.file), device=device, threads=threads)
        self.providers = self.session.get_providers()
        self.device = DEVICES.get(self.providers[0], self.providers[0])  # what runs it, really
        self.static_batch = 0
        names = [self.spec.logits.name, self.spec.embedding.name]
        if self.spec.activation is not None:
            names.insert(0, self.spec.activation.name)
        self._outputs = names

    def run(self, x: np.ndarray) -> SegmentOutput:
        if x.shape[1:] != self.spec.input.per_sample:
            raise BundleError(f"segment {self.index} takes {list(self.spec.input.per_sample)} "
                              f"per sample, got {list(x.shape[1:])}")
        x = x.astype(np.float32, copy=False)
        size = self.static_batch
        if not size or len(x) in (0, size):
            out = self._run(x)
        else:
            parts = [self._run_padded(x[i:i + size], size) for i in range(0, len(x), size)]
            out = [np.concatenate(o) if len(parts) > 1 else o[0] for o in zip(*parts, strict=True)]
        if self.spec.activation is None:
            return SegmentOutput(None, out[0], out[1])
        return SegmentOutput(out[0], out[1], out[2])

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = self.session.run(self._outputs, {self.spec.input.name: x})
        return out

    def _run_padded(self, x: np.ndarray, size: int) -> list[np.ndarray]:
        n = len(x)
        if n < size:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), np.float32)])
        return [o[:n] for o in self._run(x)]


class FullModelRunner:
    """The monolithic exported model (input to final logits): the baseline for benchmarks."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int = 1) -> None:
        self.session = make_session(bundle.path(bundle.manifest.full_model), device=device,
                                    threads=threads)
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self._input: x.astype(np.float32, copy=False)})[0]
        return out
