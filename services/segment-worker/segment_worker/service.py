"""segment-worker: runs model segments, exits samples early, forwards the rest.

Starts with the segments ``OFFRAMP_WORKER_SEGMENTS`` of the bundle ``OFFRAMP_WORKER_BUNDLE`` and
then follows the priority-scheduler's plan (``control/plan``): it loads the segments the plan
gives it and drains, then unloads, the others, without losing a task. Reads packets addressed
to it (``act/{model}/{segment}/{node}``), the others' heartbeats (backlogs, credits, wants) and
the exit policy. Until an exit policy arrives, exits are closed (every sample runs to the final
exit).

SIGTERM: first say so (the heartbeat says ``draining``, advertises no segment and grants no
credit, so senders stop at once), keep reading the packets already on their way for
``OFFRAMP_WORKER_DRAIN_INTAKE_S``, then finish what is queued within ``OFFRAMP_WORKER_DRAIN_S``
and exit 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from offramp.bus import Subscription, from_payload
from offramp.errors import SettingsError
from offramp.model.bundle import load_bundle
from offramp.model.images import refuse_by_budget_only
from offramp.model.sessions import installed_providers
from offramp.node.allocator import return_large_blocks
from offramp.node.cpushare import lower_priority
from offramp.node.entry import ServiceSpec
from offramp.node.peers import PeerTable
from offramp.node.runtime import BusFactory, Runtime
from offramp.policy.bundles import conflicts
from offramp.wire import ExitPolicy, Heartbeat, Plan, SegmentRef
from segment_worker.engine import Engine, Port
from segment_worker.hosting import Hosting
from segment_worker.settings import DEVICE_HINT, PREFIX, EngineConfig, WorkerSettings


def _check_segments(name: str, segments: tuple[int, ...], k: int, model: str) -> None:
    for seg in segments:
        if not 1 <= seg <= k:
            raise SettingsError(f"{name}: segment {seg} is not in 1..{k} of {model}")


async def run(settings: WorkerSettings, stop: asyncio.Event, *,
              connect: BusFactory | None = None) -> None:
    """Serve until ``stop`` is set (``connect`` makes the bus; default: MQTT)."""
    not_done = lower_priority(settings.nice)
    bundle = load_bundle(settings.bundle)
    return_large_blocks()  # frames decoded here (segment 1): their buffers go back when freed
    refuse_by_budget_only()  # Pillow's own bomb warning: offramp's budget says it
    k = bundle.num_segments
    segments = settings.segments or tuple(range(1, k + 1))
    loadable = settings.loadable or tuple(range(1, k + 1))
    _check_segments("OFFRAMP_WORKER_SEGMENTS", segments, k, bundle.name)
    _check_segments("OFFRAMP_WORKER_LOADABLE", loadable, k, bundle.name)
    if settings.device == "tensorrt" and settings.trt_precision == "int8" \
            and not settings.trt_cache:
        raise SettingsError("OFFRAMP_WORKER_TRT_PRECISION=int8 needs OFFRAMP_WORKER_TRT_CACHE: "
                            "TensorRT reads each segment's calibration table from its engine "
                            "folder there")
    common = settings.common
    cfg = EngineConfig.from_settings(settings)
    runtime = Runtime("worker", common, bus=connect,
                      bundle=await asyncio.to_thread(lambda: bundle.identity))
    bus, topics = runtime.bus, runtime.topics

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        await bus.publish(topic, payload, qos=qos)

    port = Port(topics, publish, nudge=runtime.beat_soon, max_payload=bus.max_payload,
                unsent=bus.unsent_bytes)
    engine = Engine(bundle, cfg, PeerTable(cfg.node, runtime.bundle), port,
                    metrics=runtime.metrics, tracing=runtime.tracing)
    loadable_refs = tuple(SegmentRef(model=bundle.name, segment=s) for s in loadable)
    runtime.heartbeat_with(lambda hb: replace(engine.heartbeat(hb, bus.tcp_info()),
                                              loadable=loadable_refs,
                                              max_segments=settings.max_segments))
    runtime.metrics.on_collect(engine.read)
    runtime.require(lambda: engine.warming)  # "building TensorRT engines, segment 2 of 3"
    runtime.require(lambda: None if engine.serving() else "hosts no segment")
    runtime.require(lambda: None if engine.policy else "no exit policy yet")
    hosting = Hosting(engine, lambda seg: bus.subscribe(topics.act(bundle.name, seg, cfg.node)),
                      max_bytes=common.bus.max_message_bytes, grace_s=settings.unload_grace_s,
                      log=runtime.log)
    async with runtime, engine:
        for i, seg in enumerate(segments, start=1):
            await hosting.load(seg, (i, len(segments)))
        runtime.log.info("worker_ready", model=bundle.name, segments=list(segments),
                         providers=engine.providers, nice=settings.nice,
                         resident=cfg.resident, static_batch=engine.static_batch)
        if not_done:
            runtime.log.warning("nice_not_applied", nice=settings.nice, problems=not_done)
        if engine.device != settings.device:
            runtime.log.warning("device_unavailable", asked=settings.device, using=engine.device,
                                available=installed_providers(), hint=DEVICE_HINT,
                                libraries=engine.gpu_libraries or None)
        # the nodes that send to this worker or that it sends to (credit, loads, wants);
        # the scheduler's and the arbiter's heartbeats say nothing a worker acts on
        states = [await bus.subscribe(topics.state_all(role), maxsize=1024,
                                      decode=from_payload(Heartbeat.decode))
                  for role in ("worker", "admission")]
        policies = await bus.subscribe(topics.exit_policy(bundle.name), maxsize=8,
                                       decode=from_payload(ExitPolicy.decode))
        plans = await bus.subscribe(topics.plan(), maxsize=8, overflow="drop-oldest",
                                    decode=from_payload(Plan.decode))
        async with asyncio.TaskGroup() as tg:
            hosting.start(tg)
            control = [*(tg.create_task(_states(sub, engine, runtime)) for sub in states),
                       tg.create_task(_policies(policies, engine, runtime)),
                       tg.create_task(_plans(plans, engine, hosting, set(loadable),
                                             settings.follow_plan))]
            await stop.wait()
            await _drain(settings, cfg, runtime, engine, hosting)
            for task in control:
                task.cancel()


async def _drain(settings: WorkerSettings, cfg: EngineConfig, runtime: Runtime, engine: Engine,
                 hosting: Hosting) -> None:
    """Stop advertising first, then stop reading, then finish: senders see the draining
    heartbeat within a gap, packets they sent before it still arrive and are served."""
    engine.drain()
    runtime.drain()
    intake_s = cfg.drain_intake_s(settings.drain_intake_s)
    runtime.log.info("worker_draining", queued=engine.queued(), intake_s=intake_s)
    deadline = time.monotonic() + settings.drain_s
    await asyncio.sleep(intake_s)
    hosting.stop_intake()
    while not engine.idle() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        if not await engine.settle():
            # the next segment's hosts are all gone or stopping too (the whole system stops):
            # the owner of that work dispatches it again or answers it; waiting cannot help
            runtime.log.warning("drain_stranded", parked=engine.parked())
            break
    hosting.finish()


async def _states(states: Subscription[Heartbeat], engine: Engine, runtime: Runtime) -> None:
    conflicting: set[str] = set()  # said once per peer, until it serves this bundle again
    async for hb in states:
        if await engine.observe(hb):
            if hb.node not in conflicting:
                runtime.log.error("bundle_conflict", peer=hb.node, theirs=hb.bundle,
                                  ours=runtime.bundle, detail="no activation is sent to it; "
                                  "start every service on the same bundle")
            conflicting.add(hb.node)
        else:
            conflicting.discard(hb.node)


async def _policies(policies: Subscription[ExitPolicy], engine: Engine,
                    runtime: Runtime) -> None:
    async for policy in policies:
        expected = engine.segment_count - 1
        if conflicts(runtime.bundle, policy.bundle):
            runtime.log.error("exit_policy_mismatch", theirs=policy.bundle, ours=runtime.bundle,
                              detail="the exit-arbiter serves other graphs of this model; "
                              "start every service on the same bundle")
            continue
        if len(policy.thresholds) != expected:
            runtime.log.warning("exit_policy_mismatch", got=len(policy.thresholds),
                                expected=expected)
            continue
        if not engine.apply_policy(policy):
            continue  # an older policy (redelivered retained message)
        runtime.log.debug("exit_policy_applied", epoch=policy.epoch, criterion=policy.criterion,
                          thresholds=list(policy.thresholds))


async def _plans(plans: Subscription[Plan], engine: Engine, hosting: Hosting, loadable: set[int],
                 follow: bool) -> None:
    """Every plan gives the placer its routes (the fallback when heartbeats are stale); with
    ``OFFRAMP_WORKER_FOLLOW_PLAN`` the hosted segments follow it too."""
    async for plan in plans:
        engine.apply_plan(plan)
        if follow:
            await hosting.follow(plan, loadable)


SERVICE = ServiceSpec(name="segment-worker", module="segment_worker", settings=WorkerSettings,
                      prefix=PREFIX, run=run)
