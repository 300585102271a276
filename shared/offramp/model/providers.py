"""Which ONNX Runtime execution providers run a segment, and with which options: CUDA graphs,
TensorRT's engine cache, precision and optimisation profile. Pure: the options are computed
here and tested without a GPU; :mod:`offramp.model.sessions` hands them to ONNX Runtime.

TensorRT builds an engine per segment the first time a session runs (minutes on a Jetson). The
cache keeps it on disk, in a folder per segment file, batch and precision::

    <cache>/<model>/<segment file>-<sha256 of it, 12 hex>/b<batch>-<precision>/

so that a rebuilt bundle or another batch size never picks up a stale engine, and a restarted
pod (the cache on a volume) does not build again. The timing cache is shared by all of them:
it makes every later build faster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "fp16", "int8"]
ProviderList = list[tuple[str, dict[str, Any]]]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
DEVICES = {provider: device for device, provider in PROVIDERS.items()}
FALLBACKS = {"cpu": ("cpu",), "cuda": ("cuda", "cpu"), "tensorrt": ("tensorrt", "cuda", "cpu")}
# What ONNX Runtime's own calibration tool writes (onnxruntime.quantization); read by the
# TensorRT provider from the engine folder when trt_int8_use_native_calibration_table is 0.
INT8_TABLE = "calibration.flatbuffers"


@dataclass(frozen=True)
class GpuOptions:
    """How a segment runs on a GPU (ignored on the CPU)."""

    cuda_graph: bool = True  # one CUDA graph per session at its static batch
    trt_cache: str = ""  # TensorRT engine cache folder ('' : engines are built at every start)
    trt_precision: Precision = "fp16"
    trt_workspace_mb: int = 2048
    device_id: int = 0


@dataclass(frozen=True)
class SegmentShape:
    """What a TensorRT engine is built for: the input's name and its shape at the batch size."""

    model: str
    file: Path
    input_name: str
    per_sample: tuple[int, ...]
    batch: int  # the static batch (0: none, the engine takes batches up to 64)


def engine_folder(cache: str, shape: SegmentShape, precision: Precision) -> Path:
    """Where the engine of this segment, batch and precision is kept (see the module doc)."""
    digest = hashlib.sha256(shape.file.read_bytes()).hexdigest()[:12]
    batch = f"b{shape.batch}" if shape.batch else "b1-64"
    return Path(cache) / shape.model / f"{shape.file.stem}-{digest}" / f"{batch}-{precision}"


def _profile(shape: SegmentShape, batch: int) -> str:
    return f"{shape.input_name}:" + "x".join(str(d) for d in (batch, *shape.per_sample))


def provider_list(device: str, installed: list[str], gpu: GpuOptions,
                  shape: SegmentShape | None = None) -> ProviderList:
    """The providers, best first, with their options, among those ``installed``. CUDA graphs
    need a static batch (every run at the same addresses), so they are asked for only where
    ``shape.batch`` is set; TensorRT needs ``shape`` for its profile and cache folder."""
    if device not in FALLBACKS:
        raise ValueError(f"device {device!r} is not one of {', '.join(FALLBACKS)}")
    static = shape is not None and shape.batch > 0
    out: ProviderList = []
    for name in FALLBACKS[device]:
        provider = PROVIDERS[name]
        if provider not in installed:
            continue
        if name == "cuda":
            opts: dict[str, Any] = {"device_id": gpu.device_id}
            if gpu.cuda_graph and static and device == "cuda":
                opts["enable_cuda_graph"] = "1"
            out.append((provider, opts))
        elif name == "tensorrt" and shape is not None:
            out.append((provider, tensorrt_options(gpu, shape)))
        elif name == "cpu":
            out.append((provider, {}))
    return out


def tensorrt_options(gpu: GpuOptions, shape: SegmentShape) -> dict[str, Any]:
    """The TensorRT provider's options for one segment (names as ONNX Runtime spells them)."""
    lo, hi = (shape.batch, shape.batch) if shape.batch else (1, 64)
    opts: dict[str, Any] = {
        "device_id": gpu.device_id,
        "trt_max_workspace_size": gpu.trt_workspace_mb << 20,
        "trt_fp16_enable": gpu.trt_precision in ("fp16", "int8"),  # int8 falls back to fp16
        "trt_int8_enable": gpu.trt_precision == "int8",
        "trt_profile_min_shapes": _profile(shape, lo),
        "trt_profile_opt_shapes": _profile(shape, hi),
        "trt_profile_max_shapes": _profile(shape, hi),
    }
    if gpu.trt_precision == "int8":
        opts["trt_int8_calibration_table_name"] = INT8_TABLE
        opts["trt_int8_use_native_calibration_table"] = False
    if gpu.cuda_graph and shape.batch:
        opts["trt_cuda_graph_enable"] = True
    if gpu.trt_cache:
        folder = engine_folder(gpu.trt_cache, shape, gpu.trt_precision)
        opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
                 "trt_timing_cache_enable": True, "trt_timing_cache_path": gpu.trt_cache}
    return opts
