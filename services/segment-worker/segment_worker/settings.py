"""The segment-worker's settings (``OFFRAMP_WORKER_*``) and the engine's configuration made
from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from offramp.model.providers import GpuOptions
from offramp.settings import CommonSettings, nested, setting

PREFIX = "OFFRAMP_WORKER_"
DEVICE_HINT = ("cuda needs onnxruntime-gpu instead of onnxruntime, built for the CUDA the "
               "machine has (PyPI: 1.27 and later for CUDA 13, 1.26 and earlier for CUDA 12), "
               "cuDNN 9 and an NVIDIA GPU; tensorrt also needs TensorRT")


@dataclass(frozen=True)
class WorkerSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    segments: tuple[int, ...] = setting((), "Segments hosted at start, e.g. 1,2 (empty: all)")
    loadable: tuple[int, ...] = setting((), "Segments the plan may give this node (empty: all)")
    max_segments: int = setting(0, "Most segments hosted at once, for the plan (0: no limit)",
                                min=0, max=999)
    follow_plan: bool = setting(True, "Load and unload segments as the scheduler's plan says")
    device: Literal["cpu", "cuda", "tensorrt"] = setting(
        "cpu", "ONNX Runtime device; cuda/tensorrt fall back to CPU when not available (the "
        "worker warns 'device_unavailable' and its heartbeat says which device it runs on)")
    threads: int = setting(1, "ONNX Runtime intra-op threads", min=1, max=256)
    resident: Literal["auto", "on", "off"] = setting(
        "auto", "Keep activations on the device between the segments hosted here (ONNX "
        "Runtime IO binding); only logits and embeddings come to the host for the exit "
        "decision. auto: on for cuda and tensorrt, off on the CPU (where it saves nothing)")
    cuda_graph: bool = setting(True, "Replay each segment as a CUDA graph at the static batch "
                               "(cuda and tensorrt, with resident activations)")
    trt_cache: str = setting("", "TensorRT engine cache folder; mount a volume there so a "
                             "restart does not build the engines again ('': build at every "
                             "start)")
    trt_precision: Literal["fp32", "fp16", "int8"] = setting(
        "fp16", "TensorRT precision; int8 reads the calibration tables `offramp calibrate "
        "--int8` writes into the bundle, and needs OFFRAMP_WORKER_TRT_CACHE")
    trt_workspace_mb: int = setting(2048, "Most GPU memory TensorRT may use while building an "
                                    "engine, MiB", min=64, max=1 << 20)
    gpu_id: int = setting(0, "CUDA device number", min=0, max=63)
    batch_max: int = setting(8, "Largest micro-batch", min=1, max=1024)
    batch_wait_ms: float = setting(2.0, "Longest wait to fill a micro-batch", min=0, max=1000)
    run_through: bool = setting(True, "Run a micro-batch on through the next segments hosted "
                                "here in one go (one hand-off to the inference thread, rows "
                                "kept on the device), where nothing waits for them and no "
                                "neighbour would take them")
    queue_max: int = setting(512, "Bound of each segment queue, in samples; also the most "
                             "credit this node grants", min=1, max=1_000_000)
    credit_queue_s: float = setting(0.5, "Most seconds of queued work this node grants credit "
                                    "for (at the measured time a sample takes through the "
                                    "segments it runs here, at least two micro-batches); more "
                                    "waits at its sender, which gives it to whichever node frees "
                                    "first (0: OFFRAMP_WORKER_QUEUE_MAX alone)", min=0, max=3600)
    ageing_s: float = setting(0.5, "Queue ageing tau: urgency = priority x (1 + age / tau)",
                              min=0.001, max=3600)
    codec: Literal["auto", "raw", "fp16", "int8", "ae"] = setting(
        "auto", "Codec of activations sent to others: auto chooses per cut the one with the "
        "least expected time over the link as measured, within codec_max_loss; ae pins the "
        "bundle's autoencoder at each cut (raw where it has none)")
    codec_max_loss: float = setting(1.0, "Points of final-exit accuracy the automatic choice "
                                     "may give up to a codec (as offramp compress measured "
                                     "them; a codec never measured is not chosen)", min=0,
                                     max=100)
    offload_margin_ms: float = setting(2.0, "A neighbour must be this much faster to get the task",
                                       min=0, max=10_000)
    credit_lease_s: float = setting(2.0, "Credit spent on packets that never arrived is written "
                                    "off after this long", min=0.1, max=600)
    send_queue_s: float = setting(0.5, "Most seconds of data (at its measured link rate) this "
                                  "worker puts into its connection at once; what else it "
                                  "places on other nodes waits parked, so its heartbeats and "
                                  "reports do not queue behind seconds of activations (0: no "
                                  "limit)", min=0, max=60)
    park_timeout_s: float = setting(5.0, "Work nobody can take is given up after this long (its "
                                    "owner dispatches it again)", min=0.1, max=3600)
    drain_s: float = setting(10.0, "On SIGTERM, how long to finish queued work", min=0, max=3600)
    drain_intake_s: float = setting(0.0, "On SIGTERM, how long to keep reading packets sent "
                                    "before the others saw the draining heartbeat (0: three "
                                    "heartbeat periods plus the link delay)", min=0, max=600)
    unload_grace_s: float = setting(1.0, "A segment the plan took away is unloaded this long "
                                    "after it is empty", min=0, max=600)
    nice: int = setting(0, "Lower this worker's CPU priority by this much at start (threads and "
                        "session group). Where workers share cores, give the ones that host "
                        "earlier segments more, so the last stages are not starved (offramp up "
                        "does this)", min=0, max=19)
    slowdown: float = setting(1.0, "Emulate a slower node: compute time x this factor", min=1,
                              max=100)
    link_mbps: float = setting(0.0, "Emulate the outgoing link's bandwidth, Mbit/s (0: as is)",
                               min=0, max=1_000_000)
    link_delay_ms: float = setting(0.0, "Emulate the outgoing link's one-way delay (0: none)",
                                   min=0, max=60_000)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """What the data path needs to know, in the units it uses (seconds, bits per second)."""

    node: str
    batch_max: int = 8
    batch_wait_s: float = 0.002
    run_through: bool = True
    queue_max: int = 512
    credit_queue_s: float = 0.5
    codec: Literal["auto", "raw", "fp16", "int8", "ae"] = "auto"
    codec_max_loss: float = 1.0
    device: str = "cpu"
    threads: int = 1
    resident: bool = False
    gpu: GpuOptions = GpuOptions()
    offload_margin_s: float = 0.002
    stale_after_s: float = 0.75
    slowdown: float = 1.0
    ageing_s: float = 0.5
    credit_lease_s: float = 2.0
    park_timeout_s: float = 5.0
    send_queue_s: float = 0.5
    link_bits_per_s: float = 0.0  # emulated outgoing link (0: as is)
    link_delay_s: float = 0.0
    heartbeat_s: float = 0.25
    max_pixels: int = 0  # frames decoded here (segment 1): the pixel budget (0: the default)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> EngineConfig:
        common = settings.common
        return cls(node=common.node_name(), batch_max=settings.batch_max,
                   batch_wait_s=settings.batch_wait_ms / 1000, run_through=settings.run_through,
                   queue_max=settings.queue_max, credit_queue_s=settings.credit_queue_s,
                   codec=settings.codec, codec_max_loss=settings.codec_max_loss,
                   device=settings.device, threads=settings.threads,
                   resident=settings.resident == "on" or (settings.resident == "auto"
                                                          and settings.device != "cpu"),
                   gpu=GpuOptions(cuda_graph=settings.cuda_graph, trt_cache=settings.trt_cache,
                                  trt_precision=settings.trt_precision,
                                  trt_workspace_mb=settings.trt_workspace_mb,
                                  device_id=settings.gpu_id),
                   offload_margin_s=settings.offload_margin_ms / 1000,
                   stale_after_s=3 * common.heartbeat_s, slowdown=settings.slowdown,
                   ageing_s=settings.ageing_s, credit_lease_s=settings.credit_lease_s,
                   park_timeout_s=settings.park_timeout_s, send_queue_s=settings.send_queue_s,
                   link_bits_per_s=settings.link_mbps * 1e6,
                   link_delay_s=settings.link_delay_ms / 1000, heartbeat_s=common.heartbeat_s,
                   max_pixels=common.max_pixels)

    def drain_intake_s(self, configured: float) -> float:
        """How long a draining worker still reads packets on their way to it."""
        return configured or 3 * self.heartbeat_s + self.link_delay_s
