"""exit-arbiter: the control plane of exit policy.

Reads the bundle's calibration, computes thresholds for the target accuracy (or takes explicit
ones), and publishes them retained on ``control/exit-policy/{model}`` (again every
``OFFRAMP_ARBITER_REPUBLISH_S``, so a broker that lost its retained messages gets them back).
Watches completions (``done/+``) for the realised exit shares and reports, in its heartbeat,
the accuracy they imply: sum over exits of share x calibrated accuracy of that exit.

With ``OFFRAMP_CONTROL_STRATEGY=threshold`` it also adapts the thresholds to the backlog along
the model (docs/algorithms.md 1.4), every ``OFFRAMP_CONTROL_TICK_S``, between the calibrated floor
(thresholds that keep ``OFFRAMP_CONTROL_ACCURACY_FLOOR``) and the configured policy as ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial

from offramp.bus import Subscription, from_payload
from offramp.errors import OfframpError, SettingsError
from offramp.model.bundle import load_bundle
from offramp.model.calibration import DEFAULT_MARGIN_Z, Calibration
from offramp.node.entry import ServiceSpec
from offramp.node.metrics import Reading
from offramp.node.peers import PeerTable
from offramp.node.runtime import BusFactory, Runtime
from offramp.policy.admission import ControlSettings, adapt_thresholds, path_backlog
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import Criterion, DoneReport, ExitPolicy, Heartbeat

PREFIX = "OFFRAMP_ARBITER_"


@dataclass(frozen=True)
class ArbiterSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    control: ControlSettings = nested(ControlSettings, "OFFRAMP_CONTROL_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    criterion: Criterion = setting("confidence", "confidence, entropy, margin or feature-difference")
    target_accuracy: float = setting(-1.0, "Target accuracy; < 0: final-exit accuracy minus "
                                     "OFFRAMP_ARBITER_TARGET_DROP", min=-1, max=1)
    target_drop: float = setting(0.01, "Accuracy given up for speed when no target is set",
                                 min=0, max=1)
    target_margin_z: float = setting(
        DEFAULT_MARGIN_Z, "Standard errors of the accuracy the exits give up (measured on the "
        "calibration set) by which thresholds must clear the target; 0: just meet it", min=0,
        max=10)
    thresholds: tuple[float, ...] = setting((), "Explicit thresholds (override the target)")
    disable_exits: bool = setting(False, "Close every early exit (all samples to the final one)")
    republish_s: float = setting(5.0, "Republish the retained policy this often", min=0.1,
                                 max=86400)




def make_policy(settings: ArbiterSettings, calib: Calibration, model: str, epoch: int
                ) -> ExitPolicy:
    """The policy the settings ask for, with the accuracy the calibration expects of it."""
    k = calib.num_exits
    target: float | None = None
    if settings.disable_exits:
        thresholds = tuple([2.0] * (k - 1))
    elif settings.thresholds:
        if len(settings.thresholds) != k - 1:
            raise SettingsError(f"OFFRAMP_ARBITER_THRESHOLDS: {model} needs {k - 1} thresholds, "
                                f"got {len(settings.thresholds)}")
        thresholds = settings.thresholds
    else:
        target = (settings.target_accuracy if settings.target_accuracy >= 0
                  else calib.exit_accuracy()[-1] - settings.target_drop)
        thresholds = calib.thresholds_for_accuracy(settings.criterion, target,
                                                   settings.target_margin_z)
    expected = calib.simulate(settings.criterion, thresholds).accuracy
    return ExitPolicy(model=model, epoch=epoch, ts=time.time(), criterion=settings.criterion,
                      thresholds=thresholds, target_accuracy=target, expected_accuracy=expected)


class Adapter:
    """Exit-threshold adaptation between a calibrated floor and the configured ceiling."""

    def __init__(self, settings: ArbiterSettings, calib: Calibration, base: ExitPolicy) -> None:
        self.s = settings.control
        self.calib = calib
        self.base = base
        floor_acc = (self.s.accuracy_floor if self.s.accuracy_floor >= 0
                     else calib.exit_accuracy()[-1] - 0.05)
        floor = calib.thresholds_for_accuracy(base.criterion, floor_acc,
                                              settings.target_margin_z)
        self.ceiling = base.thresholds
        self.floor = tuple(min(f, c) for f, c in zip(floor, self.ceiling, strict=True))

    def step(self, policy: ExitPolicy, q_path_s: float, dt_s: float) -> ExitPolicy | None:
        """The next policy, or None when the thresholds did not move."""
        new = adapt_thresholds(policy.thresholds, q_path_s, self.s, self.floor, self.ceiling,
                               dt_s)
        if max((abs(a - b) for a, b in zip(new, policy.thresholds, strict=True)),
               default=0.0) < 1e-3:
            return None
        expected = self.calib.simulate(policy.criterion, new).accuracy
        return replace(policy, epoch=policy.epoch + 1, ts=time.time(), thresholds=new,
                       expected_accuracy=expected)


class ShareTracker:
    """Realised exit shares from completions, and the accuracy they imply."""

    def __init__(self, calib: Calibration, policy: ExitPolicy) -> None:
        self.counts: Counter[int] = Counter()
        self.per_exit = calib.accuracy_at_exits(policy.criterion, policy.thresholds)

    def retarget(self, calib: Calibration, policy: ExitPolicy) -> None:
        self.per_exit = calib.accuracy_at_exits(policy.criterion, policy.thresholds)

    def add(self, exit_index: int) -> None:
        self.counts[exit_index] += 1

    def stats(self) -> dict[str, float]:
        total = sum(self.counts.values())
        out: dict[str, float] = {"completions": float(total)}
        if not total:
            return out
        implied = 0.0
        for k, acc in enumerate(self.per_exit, start=1):
            share = self.counts[k] / total
            out[f"share_exit_{k}"] = round(share, 4)
            if share and not math.isnan(acc):
                implied += share * acc
        out["implied_accuracy"] = round(implied, 4)
        return out


class Arbiter:
    """The running arbiter: the policy in force, its adaptation and the realised shares."""

    def __init__(self, settings: ArbiterSettings, calib: Calibration, model: str,
                 runtime: Runtime, dataset: str = "") -> None:
        self.s = settings
        self.calib = calib
        self.model = model
        self.rt = runtime
        self.policy = replace(make_policy(settings, calib, model, epoch=1), dataset=dataset,
                              bundle=runtime.bundle)
        self.adapter = Adapter(settings, calib, self.policy)
        self.shares = ShareTracker(calib, self.policy)
        self.peers = PeerTable()
        self.changed = asyncio.Event()
        runtime.metrics.on_collect(self._read)

    def _read(self, r: Reading) -> None:
        for k, t in enumerate(self.policy.thresholds, start=1):
            r.gauge("offramp_exit_threshold", "Exit threshold in force, by exit", t, exit=k)
        r.gauge("offramp_exit_policy_epoch", "Epoch of the exit policy in force",
                self.policy.epoch)
        stats = self.shares.stats()
        if "implied_accuracy" in stats:
            r.gauge("offramp_implied_accuracy", "Accuracy the realised exit shares imply",
                    stats["implied_accuracy"])

    def heartbeat(self, hb: Heartbeat) -> Heartbeat:
        stats = self.shares.stats()
        stats["epoch"] = float(self.policy.epoch)
        for k, t in enumerate(self.policy.thresholds, start=1):
            stats[f"threshold_{k}"] = round(t, 4)
        return replace(hb, stats=stats)

    async def publish(self) -> None:
        bus, topic = self.rt.bus, self.rt.topics.exit_policy(self.model)
        while True:
            try:
                await bus.publish(topic, self.policy.encode(), qos=1, retain=True)
            except OfframpError as exc:
                self.rt.log.warning("policy_not_published", error=str(exc))
            self.changed.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: cancel-safe on 3.11
                async with asyncio.timeout(self.s.republish_s):
                    await self.changed.wait()

    async def watch(self, done: Subscription[DoneReport]) -> None:
        async for report in done:
            for c in report.completions:
                self.shares.add(c.exit_index)

    async def watch_workers(self, states: Subscription[Heartbeat]) -> None:
        async for hb in states:
            self.peers.update(hb)

    async def adapt(self, num_segments: int) -> None:
        stale = 3 * self.s.common.heartbeat_s
        tick = self.s.control.tick_s
        while True:
            await asyncio.sleep(tick)
            q = path_backlog(self.peers.segment_backlogs(self.model, num_segments, stale))
            new = self.adapter.step(self.policy, q, tick)
            if new is not None:
                self.policy = new
                self.shares.retarget(self.calib, new)
                self.changed.set()


async def run(settings: ArbiterSettings, stop: asyncio.Event, *,
              connect: BusFactory | None = None) -> None:
    """Serve until ``stop`` is set (``connect`` makes the bus; default: MQTT)."""
    bundle = load_bundle(settings.bundle)
    calib = bundle.calibration()
    runtime = Runtime("arbiter", settings.common, bus=connect,
                      bundle=await asyncio.to_thread(lambda: bundle.identity))
    arb = Arbiter(settings, calib, bundle.name, runtime,
                  dataset=str(bundle.manifest.metrics.get("dataset") or ""))
    runtime.heartbeat_with(arb.heartbeat)
    adaptive = settings.control.strategy == "threshold"
    async with runtime:
        bus, topics = runtime.bus, runtime.topics
        done = await bus.subscribe(topics.done_all(), maxsize=65536, decode=from_payload(
            partial(DoneReport.decode, max_bytes=settings.common.bus.max_message_bytes)))
        # worker heartbeats matter only to the threshold strategy: no subscription otherwise
        states = await bus.subscribe(topics.state_all("worker"), maxsize=1024,
                                     decode=from_payload(Heartbeat.decode)) if adaptive else None
        base = arb.policy
        runtime.log.info("exit_policy", model=bundle.name, thresholds=list(base.thresholds),
                         target=base.target_accuracy, expected=round(base.expected_accuracy, 4),
                         adaptive=adaptive, floor=list(arb.adapter.floor))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(arb.publish()), tg.create_task(arb.watch(done))]
            if states is not None:
                tasks += [tg.create_task(arb.watch_workers(states)),
                          tg.create_task(arb.adapt(bundle.num_segments))]
            await stop.wait()
            for t in tasks:
                t.cancel()


__all__ = ["Adapter", "Arbiter", "ArbiterSettings", "ShareTracker", "make_policy", "run"]


SERVICE = ServiceSpec(name="exit-arbiter", module="exit_arbiter", settings=ArbiterSettings,
                      prefix=PREFIX, run=run)
