"""segment-worker: runs model segments, exits samples early, forwards the rest.

Starts with the segments ``OFFRAMP_WORKER_SEGMENTS`` of the bundle ``OFFRAMP_WORKER_BUNDLE`` and
then follows the priority-scheduler's plan (``control/plan``): it loads the segments the plan
gives it and drains, then unloads, the others, without losing a task. Reads packets addressed
to it (``act/{model}/{segment}/{node}``), the others' heartbeats (backlogs, credits, wants) and
the exit policy. Until an exit policy arrives, exits are closed (every sample runs to the final
exit). SIGTERM: stop taking work, finish what is queued within ``OFFRAMP_WORKER_DRAIN_S``, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Literal

from offramp.bus.connection import Subscription
from offramp.errors import SettingsError, WireError
from offramp.model.bundle import load_bundle
from offramp.model.sessions import installed_providers
from offramp.node.cpushare import lower_priority
from offramp.node.entry import ServiceSpec
from offramp.node.metrics import Reading
from offramp.node.peers import PeerTable
from offramp.node.runtime import Runtime
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import ExitPolicy, Heartbeat, Plan, SegmentRef
from segment_worker.engine import Engine
from segment_worker.hosting import Hosting
from segment_worker.placer import EngineConfig

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
    batch_max: int = setting(8, "Largest micro-batch", min=1, max=1024)
    batch_wait_ms: float = setting(2.0, "Longest wait to fill a micro-batch", min=0, max=1000)
    queue_max: int = setting(512, "Bound of each segment queue, in samples; also the most "
                             "credit this node grants", min=1, max=1_000_000)
    ageing_s: float = setting(0.5, "Queue ageing tau: urgency = priority x (1 + age / tau)",
                              min=0.001, max=3600)
    codec: Literal["raw", "fp16", "int8"] = setting("raw", "Codec of activations sent to others")
    offload_margin_ms: float = setting(2.0, "A neighbour must be this much faster to get the task",
                                       min=0, max=10_000)
    credit_lease_s: float = setting(2.0, "Credit spent on packets that never arrived is written "
                                    "off after this long", min=0.1, max=600)
    park_timeout_s: float = setting(5.0, "Work nobody can take is given up after this long (its "
                                    "owner dispatches it again)", min=0.1, max=3600)
    drain_s: float = setting(10.0, "On SIGTERM, how long to finish queued work", min=0, max=3600)
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




def _check_segments(name: str, segments: tuple[int, ...], k: int, model: str) -> None:
    for seg in segments:
        if not 1 <= seg <= k:
            raise SettingsError(f"{name}: segment {seg} is not in 1..{k} of {model}")


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    not_done = lower_priority(settings.nice)
    bundle = load_bundle(settings.bundle)
    k = bundle.num_segments
    segments = settings.segments or tuple(range(1, k + 1))
    loadable = settings.loadable or tuple(range(1, k + 1))
    _check_segments("OFFRAMP_WORKER_SEGMENTS", segments, k, bundle.name)
    _check_segments("OFFRAMP_WORKER_LOADABLE", loadable, k, bundle.name)
    common = settings.common
    node = common.node_name()
    peers = PeerTable(node)
    holder: dict[str, Engine] = {}
    runtime = Runtime("worker", common, heartbeat=lambda hb: _beat(hb, holder, settings,
                                                                   loadable, bundle.name))
    cfg = EngineConfig(node, segments, settings.batch_max, settings.batch_wait_ms / 1000,
                       settings.queue_max, settings.codec, settings.device, settings.threads,
                       settings.offload_margin_ms / 1000, 3 * common.heartbeat_s,
                       settings.slowdown, settings.ageing_s, settings.credit_lease_s,
                       settings.park_timeout_s, settings.link_mbps, settings.link_delay_ms,
                       common.heartbeat_s)

    async with runtime:
        bus, topics = runtime.bus, runtime.topics

        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await bus.publish(topic, payload, qos=qos)

        engine = Engine(bundle, cfg, topics, peers, publish, metrics=runtime.metrics,
                        nudge=runtime.beat_soon)
        runtime.metrics.on_collect(lambda reading: _read(reading, engine))
        runtime.require(lambda: None if engine.serving() else "hosts no segment")
        runtime.require(lambda: None if engine.policy else "no exit policy yet")
        hosting = Hosting(engine, bus, topics, common.bus.max_message_bytes,
                          settings.unload_grace_s, runtime.log)
        for seg in segments:
            await hosting.load(seg)
        holder["engine"] = engine
        runtime.log.info("worker_ready", model=bundle.name, segments=list(segments),
                         providers=engine.providers, nice=settings.nice)
        if not_done:
            runtime.log.warning("nice_not_applied", nice=settings.nice, problems=not_done)
        if engine.device != settings.device:
            runtime.log.warning("device_unavailable", asked=settings.device, using=engine.device,
                                available=installed_providers(), hint=DEVICE_HINT)
        states = await bus.subscribe(topics.state_all(), maxsize=1024)
        policies = await bus.subscribe(topics.exit_policy(bundle.name), maxsize=8)
        plans = await bus.subscribe(topics.plan(), maxsize=8, overflow="drop-oldest")
        async with asyncio.TaskGroup() as tg:
            hosting.start(tg)
            control = [tg.create_task(_states(states, engine)),
                       tg.create_task(_policies(policies, engine, runtime))]
            if settings.follow_plan:
                control.append(tg.create_task(_plans(plans, hosting, set(loadable), runtime)))
            await stop.wait()
            runtime.log.info("worker_draining", queued=sum(len(h.queue)
                                                           for h in engine.hosted.values()))
            await hosting.stop_intake()
            deadline = time.monotonic() + settings.drain_s
            while not engine.idle() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                await engine.placer.retry()
            hosting.finish()
            for task in control:
                task.cancel()
        engine.executor.shutdown(wait=False, cancel_futures=True)


def _beat(hb: Heartbeat, holder: dict[str, Engine], settings: WorkerSettings,
          loadable: tuple[int, ...], bundle_name: str) -> Heartbeat:
    engine = holder.get("engine")
    if engine is None:  # still loading: say what it can host, not yet what it serves
        return replace(hb, loadable=tuple(SegmentRef(model=bundle_name, segment=s) for s in loadable),
                       max_segments=settings.max_segments)
    c = engine.counters
    stats = {"bad_packets": c.bad_packets, "misrouted": c.misrouted, "expired": c.expired,
             "queue_overflow": c.queue_overflow, "completions": c.completions,
             "without_credit": c.without_credit, "publish_failed": c.publish_failed,
             "parked": engine.placer.parked(), "park_expired": engine.placer.park_expired}
    return replace(hb, segments=engine.loads(time.monotonic()),
                   stats={k: float(v) for k, v in stats.items()}, boot=engine.boot,
                   flops_per_s=engine.flops_per_s(), wants=engine.placer.wants(),
                   sent=engine.placer.sent(), link_bps=settings.link_mbps * 1e6 / 8,
                   link_rtt_s=settings.link_delay_ms / 1000,
                   loadable=tuple(SegmentRef(model=engine.model, segment=s) for s in loadable),
                   max_segments=settings.max_segments, device=engine.device)


def _read(r: Reading, engine: Engine) -> None:
    for seg, h in engine.hosted.items():
        r.gauge("offramp_queue_length", "Samples queued, by segment", len(h.queue), segment=seg)
        r.gauge("offramp_queue_backlog_seconds", "Queued work in seconds, by segment",
                len(h.queue) * h.stats.service_s, segment=seg)
        r.counter("offramp_samples_total", "Samples computed, by segment", h.stats.samples,
                  segment=seg)
        r.counter("offramp_samples_exited_total", "Samples that exited, by segment",
                  h.stats.exited, segment=seg)
    r.gauge("offramp_parked", "Samples waiting for a neighbour's credit", engine.placer.parked())
    c = engine.counters
    for reason, n in (("queue-overflow", c.queue_overflow), ("bad-packet", c.bad_packets),
                      ("misrouted", c.misrouted), ("expired", c.expired),
                      ("park-timeout", engine.placer.park_expired)):
        r.counter("offramp_drops_total", "Samples given up here, by reason (their frame is "
                  "dispatched again by the admission-controller)", n, reason=reason)


async def _states(sub: Subscription, engine: Engine) -> None:
    async for msg in sub:
        with contextlib.suppress(WireError):
            hb = Heartbeat.decode(msg.payload)
            if engine.placer.peers.update(hb):
                engine.placer.forget(hb.node)
            await engine.placer.retry()
            if hb.wants and engine.credit_due():
                engine.nudge()


async def _policies(sub: Subscription, engine: Engine, runtime: Runtime) -> None:
    async for msg in sub:
        try:
            policy = ExitPolicy.decode(msg.payload)
        except WireError as exc:
            runtime.log.warning("bad_exit_policy", error=str(exc))
            continue
        expected = engine.bundle.num_segments - 1
        if len(policy.thresholds) != expected:
            runtime.log.warning("exit_policy_mismatch", got=len(policy.thresholds),
                                expected=expected)
            continue
        if engine.policy is not None and policy.epoch < engine.policy.epoch \
                and policy.ts <= engine.policy.ts:
            continue  # an older policy (redelivered retained message)
        engine.policy = policy
        runtime.log.debug("exit_policy_applied", epoch=policy.epoch, criterion=policy.criterion,
                          thresholds=list(policy.thresholds))


async def _plans(sub: Subscription, hosting: Hosting, loadable: set[int],
                 runtime: Runtime) -> None:
    async for msg in sub:
        try:
            plan = Plan.decode(msg.payload)
        except WireError as exc:
            runtime.log.warning("bad_plan", error=str(exc))
            continue
        await hosting.follow(plan, loadable)


SERVICE = ServiceSpec(name="segment-worker", module="segment_worker", settings=WorkerSettings,
                      prefix=PREFIX, run=run)
