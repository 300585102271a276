"""segment-worker: runs model segments, exits samples early, forwards the rest.

Hosts the segments ``OFFRAMP_WORKER_SEGMENTS`` of the bundle ``OFFRAMP_WORKER_BUNDLE``. Reads
packets addressed to it (``act/{model}/{segment}/{node}``) and to any host of its segments
(the shared subscription on ``act/{model}/{segment}``), neighbours' heartbeats, and the exit
policy. Until an exit policy arrives, exits are closed (every sample runs to the final exit).
SIGTERM: stop taking work, finish what is queued within ``OFFRAMP_WORKER_DRAIN_S``, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Literal

from offramp.bundle import load_bundle
from offramp.bus import Subscription
from offramp.errors import SettingsError, WireError
from offramp.peers import PeerTable
from offramp.service import Runtime
from offramp.services.segment_worker.engine import Engine, EngineConfig
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import ExitPolicy, Heartbeat

PREFIX = "OFFRAMP_WORKER_"


@dataclass(frozen=True)
class WorkerSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    segments: tuple[int, ...] = setting((), "Segments this worker hosts, e.g. 1,2 (empty: all)")
    device: Literal["cpu", "cuda", "tensorrt"] = setting(
        "cpu", "ONNX Runtime device; cuda/tensorrt fall back to CPU when not available")
    threads: int = setting(1, "ONNX Runtime intra-op threads", min=1, max=256)
    batch_max: int = setting(8, "Largest micro-batch", min=1, max=1024)
    batch_wait_ms: float = setting(2.0, "Longest wait to fill a micro-batch", min=0, max=1000)
    queue_max: int = setting(512, "Bound of each segment queue, in samples", min=1, max=1_000_000)
    codec: Literal["raw", "fp16", "int8"] = setting("raw", "Codec of activations sent to others")
    offload_margin_ms: float = setting(2.0, "A neighbour must be this much faster to get the task",
                                       min=0, max=10_000)
    drain_s: float = setting(10.0, "On SIGTERM, how long to finish queued work", min=0, max=3600)
    slowdown: float = setting(1.0, "Emulate a slower node: compute time x this factor", min=1,
                              max=100)


SETTINGS = WorkerSettings  # what `offramp settings` and the entry point read


async def run(settings: WorkerSettings, stop: asyncio.Event) -> None:
    bundle = load_bundle(settings.bundle)
    segments = settings.segments or tuple(range(1, bundle.num_segments + 1))
    for seg in segments:
        if not 1 <= seg <= bundle.num_segments:
            raise SettingsError(f"OFFRAMP_WORKER_SEGMENTS: segment {seg} is not in "
                                f"1..{bundle.num_segments} of {bundle.name}")
    common = settings.common
    node = common.node_name()
    peers = PeerTable(node)
    holder: dict[str, Engine] = {}
    runtime = Runtime("worker", common, heartbeat=lambda hb: _beat(hb, holder))
    cfg = EngineConfig(node, segments, settings.batch_max, settings.batch_wait_ms / 1000,
                       settings.queue_max, settings.codec, settings.device, settings.threads,
                       settings.offload_margin_ms / 1000, 3 * common.heartbeat_s,
                       settings.slowdown)

    async with runtime:
        bus, topics = runtime.bus, runtime.topics

        async def publish(topic: str, payload: bytes, qos: int) -> None:
            await bus.publish(topic, payload, qos=qos)

        engine = Engine(bundle, cfg, topics, peers, publish)
        holder["engine"] = engine
        runtime.log.info("worker_ready", model=bundle.name, segments=list(segments),
                         providers=engine.providers)
        work = [await bus.subscribe(topics.act(bundle.name, s, node), qos=0) for s in segments]
        work += [await bus.subscribe(topics.act(bundle.name, s), qos=0,
                                     shared_group=f"{bundle.name}-{s}") for s in segments]
        states = await bus.subscribe(topics.state_all("worker"), maxsize=256)
        policies = await bus.subscribe(topics.exit_policy(bundle.name), maxsize=8)
        max_bytes = common.bus.max_message_bytes
        finishing = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            intake = [tg.create_task(_intake(sub, engine, max_bytes)) for sub in work]
            control = [tg.create_task(_states(states, peers)),
                       tg.create_task(_policies(policies, engine, runtime))]
            servers = [tg.create_task(engine.serve(s, finishing)) for s in segments]
            await stop.wait()
            runtime.log.info("worker_draining", queued=sum(len(q) for q in engine.queues.values()))
            for task in intake:
                task.cancel()
            for sub in work:
                await sub.close()
            deadline = time.monotonic() + settings.drain_s
            while not engine.idle() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls two conditions
                await asyncio.sleep(0.02)
            finishing.set()
            for task in [*servers, *control]:
                task.cancel()
        engine.executor.shutdown(wait=False, cancel_futures=True)


def _beat(hb: Heartbeat, holder: dict[str, Engine]) -> Heartbeat:
    engine = holder.get("engine")
    if engine is None:
        return hb
    c = engine.counters
    stats = {"bad_packets": c.bad_packets, "misrouted": c.misrouted, "expired": c.expired,
             "queue_overflow": c.queue_overflow, "completions": c.completions,
             "dropped_unroutable": c.dropped_unroutable}
    return replace(hb, segments=engine.loads(), stats={k: float(v) for k, v in stats.items()},
                   capacity_s=float(engine.cfg.queue_max))


async def _intake(sub: Subscription, engine: Engine, max_bytes: int) -> None:
    async for msg in sub:
        engine.accept(msg.payload, max_bytes)


async def _states(sub: Subscription, peers: PeerTable) -> None:
    async for msg in sub:
        with contextlib.suppress(WireError):
            peers.update(Heartbeat.decode(msg.payload))


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
        engine.policy = policy
        runtime.log.info("exit_policy_applied", epoch=policy.epoch, criterion=policy.criterion,
                         thresholds=list(policy.thresholds))
