"""priority-scheduler: the control plane of placement (docs/algorithms.md 3.4).

Keeps the node registry (worker heartbeats and wills) and the source registry (file and
retained ``control/source/+`` messages, plus the rates admission-controllers observe), and
publishes the allocation plan retained on ``control/plan``: which segments each node hosts,
and each source's route. It re-plans when a node joins or dies, when a node's backlog moves by
more than ``OFFRAMP_SCHEDULER_LOAD_MARGIN_S`` or the sources change, at most once every
``OFFRAMP_SCHEDULER_MIN_INTERVAL_S``, and publishes only plans that differ from the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace

from offramp.bus import Subscription, from_payload
from offramp.errors import OfframpError
from offramp.model.bundle import Bundle, load_bundle
from offramp.node.entry import ServiceSpec
from offramp.node.metrics import Reading
from offramp.node.runtime import BusFactory, Runtime
from offramp.node.sources import Registration, SourceRegistry, SourceSettings, registration
from offramp.policy.plan import ModelInfo, plan
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import ExitPolicy, Heartbeat, Plan, SegmentRef
from priority_scheduler.cluster import ClusterView

PREFIX = "OFFRAMP_SCHEDULER_"


@dataclass(frozen=True)
class SchedulerSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    sources: SourceSettings = nested(SourceSettings, "OFFRAMP_SOURCES_")
    bundle: str = setting("bundles/demo", "Model bundle directory (segment FLOPs, sizes, exits)")
    settle_s: float = setting(1.0, "Wait this long after start for heartbeats before the first "
                              "plan", min=0, max=600)
    min_interval_s: float = setting(1.0, "Least time between two plans", min=0.05, max=3600)
    load_margin_s: float = setting(0.25, "Re-plan when a node's backlog moved by more than "
                                   "this, seconds", min=0.001, max=3600)
    republish_s: float = setting(10.0, "Republish the retained plan this often", min=0.1,
                                 max=86400)
    codec_max_loss: float = setting(1.0, "Accuracy points the workers' codecs may give up "
                                    "(set as OFFRAMP_WORKER_CODEC_MAX_LOSS): the plan counts the "
                                    "bytes of the smallest codec within it at each cut",
                                    min=0, max=100)




class Scheduler:
    def __init__(self, settings: SchedulerSettings, bundle: Bundle, runtime: Runtime) -> None:
        self.s = settings
        self.bundle = bundle
        self.rt = runtime
        self.registry = SourceRegistry(settings.sources)
        self.view = ClusterView(bundle.name, self.registry, 3 * settings.common.heartbeat_s)
        self.calib = bundle.calibration()
        self.policy: ExitPolicy | None = None
        self.current: Plan | None = None
        self.planned_at = -1e9
        self.snapshot: tuple[frozenset[str], dict[str, float], tuple[tuple[str, float], ...]] = \
            (frozenset(), {}, ())
        self.replans = 0
        self.started = time.monotonic()
        runtime.metrics.on_collect(self._read)
        runtime.require(lambda: None if self.current else "no plan yet")

    def _read(self, r: Reading) -> None:
        r.gauge("offramp_plan_epoch", "Epoch of the plan in force",
                self.current.epoch if self.current else 0)
        r.counter("offramp_replans_total", "Plans published", self.replans)
        r.gauge("offramp_nodes", "Live segment-workers", len(self.view.live(time.monotonic())))

    def model_info(self) -> ModelInfo:
        segs = self.bundle.manifest.segments
        k = len(segs)
        reach = [1.0] * k
        if self.policy is not None and len(self.policy.thresholds) == k - 1:
            shares = self.calib.simulate(self.policy.criterion, self.policy.thresholds).shares
            reach = [max(0.0, 1.0 - sum(shares[:i])) for i in range(k)]
        out = [self.bundle.wire_bytes(s.index, self.s.codec_max_loss) for s in segs]
        return ModelInfo(self.bundle.name, [s.flops for s in segs], out, reach)

    def why(self, now: float) -> str | None:
        """Why a new plan is due now, or None."""
        nodes, backlogs, sources = self.snapshot
        live = frozenset(self.view.live(now))
        if live - nodes:
            return "node-joined"
        if nodes - live:
            return "node-lost"
        if tuple((s.source, s.priority) for s in self.view.sources()) != sources:
            return "sources"
        if any(abs(self.view.backlog(n) - backlogs.get(n, 0.0)) > self.s.load_margin_s
               for n in live):
            return "load-shift"
        return None

    def replan(self, reason: str, now: float) -> Plan | None:
        """Compute a plan; return it if it differs from the one in force."""
        live = self.view.live(now)
        sources = self.view.sources()
        self.snapshot = (frozenset(live), {n: self.view.backlog(n) for n in live},
                         tuple((s.source, s.priority) for s in sources))
        self.planned_at = now
        current = {n: {r.segment for r in refs} for n, refs in self.current.nodes.items()} \
            if self.current else None
        alloc = plan(self.model_info(), self.view.nodes(now), sources, current=current)
        model = self.bundle.name
        nodes = {n: tuple(SegmentRef(model=model, segment=k) for k in sorted(segs))
                 for n, segs in alloc.nodes.items()}
        hosted = {k for segs in alloc.nodes.values() for k in segs}
        missing = set(range(1, len(self.bundle.manifest.segments) + 1)) - hosted
        if missing:  # not enough nodes (yet) to run the whole model: keep what runs now
            self.rt.log.warning("no_complete_plan", segments_without_host=sorted(missing),
                                nodes=live)
            return None
        if self.current is not None and nodes == self.current.nodes \
                and alloc.routes == self.current.routes:
            return None
        epoch = max((self.current.epoch + 1) if self.current else 0, int(time.time() * 1000))
        self.current = Plan(epoch=epoch, ts=time.time(), nodes=nodes, routes=alloc.routes,
                            expected_s={k: round(v, 6) for k, v in alloc.expected_s.items()}, reason=reason)
        self.replans += 1
        return self.current

    def heartbeat(self, hb: Heartbeat) -> Heartbeat:
        stats = {"replans": float(self.replans), "nodes": float(len(self.snapshot[0])),
                 "epoch": float(self.current.epoch if self.current else 0)}
        return replace(hb, stats=stats)


async def run(settings: SchedulerSettings, stop: asyncio.Event, *,
              connect: BusFactory | None = None) -> None:
    """Serve until ``stop`` is set (``connect`` makes the bus; default: MQTT)."""
    bundle = load_bundle(settings.bundle)
    runtime = Runtime("scheduler", settings.common, bus=connect,
                      bundle=await asyncio.to_thread(lambda: bundle.identity))
    sched = Scheduler(settings, bundle, runtime)
    runtime.heartbeat_with(sched.heartbeat)
    async with runtime:
        bus, topics = runtime.bus, runtime.topics
        # workers (the nodes it plans for) and admission-controllers (the sources' rates);
        # its own heartbeat and the arbiter's say nothing it plans with
        states = [await bus.subscribe(topics.state_all(role), maxsize=4096,
                                      decode=from_payload(Heartbeat.decode))
                  for role in ("worker", "admission")]
        sources = await bus.subscribe(topics.source_all(), qos=1, maxsize=1024,
                                      decode=registration(topics))
        policies = await bus.subscribe(topics.exit_policy(bundle.name), maxsize=8,
                                       decode=from_payload(ExitPolicy.decode))
        wake = asyncio.Event()

        async def publish(p: Plan) -> None:
            try:
                await bus.publish(topics.plan(), p.encode(), qos=1, retain=True)
            except OfframpError as exc:
                runtime.log.warning("plan_not_published", error=str(exc))

        # Whether a plan is due changes with heartbeats (loads, nodes heard) and with the
        # clock (a node unheard for 3 periods): looked at once a heartbeat period, and at
        # once on a will or a new source.
        poll_s = min(settings.common.heartbeat_s, settings.min_interval_s)

        async def planner() -> None:
            last_publish = time.monotonic()
            while True:
                # asyncio.timeout, not wait_for: on 3.11 a cancel that races wait_for's own
                # timeout comes out as TimeoutError, which this loop would swallow, and the
                # service would never stop (seen: SIGKILLed after its grace).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll_s):
                        await wake.wait()
                wake.clear()
                now = time.monotonic()
                if now - sched.started < settings.settle_s:
                    continue
                reason = sched.why(now) if sched.current else "start"
                if reason and now - sched.planned_at >= settings.min_interval_s:
                    new = sched.replan(reason, now)
                    if new is not None:
                        runtime.log.info("plan", epoch=new.epoch, reason=reason,
                                         nodes={n: [r.segment for r in refs]
                                                for n, refs in new.nodes.items()},
                                         routes=new.routes,
                                         speeds={n.node: round(n.flops_per_s / 1e6)
                                                 for n in sched.view.nodes(now)},
                                         rates={s.source: round(s.rate_hz, 1)
                                                for s in sched.view.sources()})
                        await publish(new)
                        last_publish = now
                if sched.current and now - last_publish >= settings.republish_s:
                    await publish(sched.current)
                    last_publish = now

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in (
                planner(), *(_states(sub, sched, wake) for sub in states),
                _sources(sources, sched, wake), _policies(policies, sched))]
            await stop.wait()
            for t in tasks:
                t.cancel()


async def _states(states: Subscription[Heartbeat], sched: Scheduler,
                  wake: asyncio.Event) -> None:
    async for hb in states:
        if sched.view.update(hb, time.monotonic()):
            wake.set()  # a will: re-plan now (subject to the minimum interval)


async def _sources(sources: Subscription[Registration], sched: Scheduler,
                   wake: asyncio.Event) -> None:
    async for reg in sources:
        sched.registry.apply(reg)
        wake.set()


async def _policies(policies: Subscription[ExitPolicy], sched: Scheduler) -> None:
    async for policy in policies:
        sched.policy = policy


SERVICE = ServiceSpec(name="priority-scheduler", module="priority_scheduler", settings=SchedulerSettings,
                      prefix=PREFIX, run=run)
