"""ONNX Runtime sessions for segments (serving side; never imports torch).

Provider choice: ``cpu`` always works; ``cuda`` and ``tensorrt`` are used when asked for *and*
available in the installed onnxruntime build (``onnxruntime-gpu``), otherwise the runner falls
back to CPU and says so in ``providers`` and ``device``. onnxruntime-gpu also falls back on its
own when the CUDA libraries it was built for cannot be loaded (PyPI's 1.27 and later need CUDA
13, 1.26 and earlier CUDA 12); ``device`` is read from the session, so it tells that too.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from offramp.model.bundle import Bundle, BundleError, SegmentSpec
from offramp.model.providers import (
    DEVICES,
    INT8_TABLE,
    PROVIDERS,
    GpuOptions,
    SegmentShape,
    engine_folder,
    provider_list,
)
from offramp.model.resident import (
    Activation,
    Batch,
    Bound,
    DeviceRows,
    Outputs,
    Row,
    RowSelector,
    on_host,
)


def installed_providers() -> list[str]:
    """The execution providers the installed onnxruntime build has (not whether a GPU and the
    CUDA libraries are there: a session tells that, see ``SegmentRunner.device``)."""
    providers: list[str] = ort.get_available_providers()
    return providers


def cuda_available() -> bool:
    """Whether the installed onnxruntime build has the CUDA execution provider."""
    return PROVIDERS["cuda"] in installed_providers()


def preload_gpu_libraries() -> str:
    """Load the CUDA and cuDNN libraries that pip's ``nvidia-*`` packages put in site-packages
    (``pip install onnxruntime-gpu[cuda,cudnn]``), so that the CUDA provider finds them without
    LD_LIBRARY_PATH. Returns what ONNX Runtime said about libraries it could not load ('': none
    missing, or a build without ``preload_dlls``, which relies on the loader's path alone).
    Loading a library twice is harmless: the second load finds the first."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not cuda_available():
        return ""
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # it prints its failures
        try:
            preload(msvc=False)
        except Exception as exc:  # e.g. a directory it expects is missing
            print(exc)
    return " ".join(said.getvalue().split())


def make_session(path: Path, *, device: str = "cpu", threads: int = 1, spin: bool = False,
                 gpu: GpuOptions | None = None,
                 shape: SegmentShape | None = None) -> ort.InferenceSession:
    """An inference session on the best available of the requested providers, with their
    options (:mod:`offramp.model.providers`; ``shape`` is what TensorRT builds for).

    Intra-op threads do not spin-wait by default: a worker hosts several segment sessions, and
    on a small CPU each session's spinning threads steal the cores the next one needs.
    """
    try:
        providers = provider_list(device, installed_providers(), gpu or GpuOptions(), shape)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=[name for name, _ in providers],
                                    provider_options=[o for _, o in providers])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise BundleError(f"cannot load {path}: {exc}") from None


def stage_int8_table(bundle: Bundle, index: int, gpu: GpuOptions, shape: SegmentShape) -> Path:
    """Copy segment ``index``'s INT8 calibration table from the bundle to where the TensorRT
    provider reads it: its engine's cache folder."""
    if not gpu.trt_cache:
        raise BundleError("TensorRT int8 needs an engine cache folder (OFFRAMP_WORKER_TRT_CACHE):"
                          " the provider reads the calibration table from there")
    table = bundle.int8_table(index)
    if not table.is_file():
        raise BundleError(f"{table} is missing: segment {index} has no INT8 calibration table; "
                          f"run `offramp calibrate {bundle.root} --int8`")
    folder = engine_folder(gpu.trt_cache, shape, "int8")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(table, folder / INT8_TABLE)
    return folder / INT8_TABLE


@dataclass(frozen=True)
class SegmentOutput:
    activation: np.ndarray | None
    logits: np.ndarray
    embedding: np.ndarray


class SegmentRunner:
    """Runs one segment of a bundle on a batch. Thread-safe (ONNX Runtime sessions are), except
    the resident path (:meth:`run_rows`, :meth:`keep`), which one thread uses.

    ``static_batch`` > 0 runs every batch at exactly that many samples: padded with zero rows,
    or split, and the real rows' answers given back. GPU workers set it to their largest
    micro-batch. On an H100, onnxruntime-gpu 1.31 took 130 to 750 ms per segment whenever a
    session's batch size changed, even back to a size it had run before (cuDNN plans kernels
    per shape), against about 1 ms for the run itself: micro-batches of varying size would pay
    that on most batches. Samples do not interact in these models, so padding changes no answer.
    A session that asked for a GPU and fell back to the CPU runs without one.

    ``resident``: :meth:`run_rows` keeps the activation on the session's device
    (:mod:`offramp.model.resident`), in buffers fixed at the static batch where there is one;
    CUDA graphs (``gpu.cuda_graph``) are used only then, as they need those fixed buffers.
    """

    def __init__(self, bundle: Bundle, index: int, *, device: str = "cpu", threads: int = 1,
                 gpu: GpuOptions | None = None, static_batch: int = 0,
                 resident: bool = False, transfers: Counter[str] | None = None) -> None:
        self.spec: SegmentSpec = bundle.segment(index)
        self.index = index
        gpu = gpu or GpuOptions()
        gpu = replace(gpu, cuda_graph=gpu.cuda_graph and resident and static_batch > 0)
        shape = SegmentShape(bundle.name, bundle.path(self.spec.file), self.spec.input.name,
                             self.spec.input.per_sample, static_batch)
        if (device == "tensorrt" and gpu.trt_precision == "int8"
                and PROVIDERS["tensorrt"] in installed_providers()):
            stage_int8_table(bundle, index, gpu, shape)
        self.graph_refused = ""  # why ONNX Runtime would not capture a CUDA graph ('': it did)
        # what ONNX Runtime said of CUDA libraries it could not load ('': none missing)
        self.gpu_libraries = preload_gpu_libraries() if device != "cpu" else ""
        try:
            self.session = make_session(bundle.path(self.spec.file), device=device,
                                        threads=threads, gpu=gpu, shape=shape)
        except BundleError as exc:
            if not gpu.cuda_graph:
                raise
            # e.g. a node the CUDA provider does not run: no graph, but the segment still runs
            self.graph_refused = str(exc)
            gpu = replace(gpu, cuda_graph=False)
            self.session = make_session(bundle.path(self.spec.file), device=device,
                                        threads=threads, gpu=gpu, shape=shape)
        self.gpu = gpu
        self.providers = self.session.get_providers()
        self.device = DEVICES.get(self.providers[0], self.providers[0])  # what runs it, really
        self.static_batch = 0 if self.device == "cpu" and device != "cpu" else static_batch
        names = [self.spec.logits.name, self.spec.embedding.name]
        if self.spec.activation is not None:
            names.insert(0, self.spec.activation.name)
        self._outputs = names
        self.bound: Bound | None = None
        if resident:
            place = "cpu" if self.device == "cpu" else "cuda"
            rows = RowSelector.load(bundle.rows_model(), place, gpu.device_id,
                                    Counter() if transfers is None else transfers)
            act = self.spec.activation.name if self.spec.activation is not None else None
            self.bound = Bound(self.session, input_name=self.spec.input.name,
                               per_sample=self.spec.input.per_sample,
                               outputs=(act, self.spec.logits.name, self.spec.embedding.name),
                               output_shapes={t.name: t.per_sample for t in (
                                   self.spec.activation, self.spec.logits, self.spec.embedding)
                                   if t is not None},
                               rows=rows, fixed_batch=self.static_batch)

    @property
    def transfers(self) -> Counter[str]:
        """Copies made by the resident path: to_device, to_host, on_device (rows gathered)."""
        return self.bound.transfers if self.bound is not None else Counter()

    def run_rows(self, xs: Batch) -> Outputs:
        """Run on queued activations (host arrays or device rows, or host rows already
        stacked: :func:`~offramp.model.resident.stack_on_host`). Resident: the activation
        stays on the device (a :class:`DeviceRows` valid until :meth:`keep` is called, which
        must be before the next run); otherwise as :meth:`run`."""
        if self.bound is None:
            out = self.run(on_host(xs))
            return Outputs(out.activation, out.logits, out.embedding)
        if self.static_batch and len(xs) > self.static_batch:
            raise BundleError(f"segment {self.index}: a batch of {len(xs)} is over its static "
                              f"batch {self.static_batch}")
        shapes = [xs.shape[1:]] if isinstance(xs, np.ndarray) else \
            [x.batch.value.shape()[1:] if isinstance(x, Row) else x.shape for x in xs]
        for shape in shapes:
            if tuple(shape) != self.spec.input.per_sample:
                raise BundleError(f"segment {self.index} takes {list(self.spec.input.per_sample)} "
                                  f"per sample, got {list(shape)}")
        return self.bound.run(xs)

    def keep(self, act: np.ndarray | DeviceRows, rows: Sequence[int]) -> list[Activation]:
        """The activations of ``rows`` of a run's output, to go on to the next segment."""
        if isinstance(act, DeviceRows):
            assert self.bound is not None
            return list(self.bound.keep(act, rows))
        return [act[i] for i in rows]

    def pass_on(self, act: np.ndarray | DeviceRows, rows: Sequence[int]) -> Batch:
        """The activations of ``rows`` for a segment run next on this thread, before this
        session runs again: references into the run's output, no copy (that segment's input
        gathers them, on the device when resident)."""
        if isinstance(act, DeviceRows):
            return [Row(act, i) for i in rows]
        return act[np.asarray(rows, np.int64)]

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
