"""exit-arbiter: the control plane of exit policy.

Reads the bundle's calibration, computes thresholds for the target accuracy (or takes explicit
ones), and publishes them retained on ``control/exit-policy/{model}`` (again every
``OFFRAMP_ARBITER_REPUBLISH_S``, so a broker that lost its retained messages gets them back).
Watches completions (``done/+``) for the realised exit shares and reports, in its heartbeat,
the accuracy they imply: sum over exits of share x calibrated accuracy of that exit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, replace

from offramp.bundle import load_bundle
from offramp.calibration import Calibration
from offramp.errors import OfframpError, SettingsError, WireError
from offramp.service import Runtime
from offramp.settings import CommonSettings, nested, setting
from offramp.wire import Completion, Criterion, ExitPolicy

PREFIX = "OFFRAMP_ARBITER_"


@dataclass(frozen=True)
class ArbiterSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    criterion: Criterion = setting("confidence", "confidence, entropy, margin or feature-difference")
    target_accuracy: float = setting(-1.0, "Target accuracy; < 0: final-exit accuracy minus "
                                     "OFFRAMP_ARBITER_TARGET_DROP", min=-1, max=1)
    target_drop: float = setting(0.01, "Accuracy given up for speed when no target is set",
                                 min=0, max=1)
    thresholds: tuple[float, ...] = setting((), "Explicit thresholds (override the target)")
    disable_exits: bool = setting(False, "Close every early exit (all samples to the final one)")
    republish_s: float = setting(5.0, "Republish the retained policy this often", min=0.1,
                                 max=86400)


SETTINGS = ArbiterSettings  # what `offramp settings` and the entry point read


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
        thresholds = calib.thresholds_for_accuracy(settings.criterion, target)
    expected = calib.simulate(settings.criterion, thresholds).accuracy
    return ExitPolicy(model, epoch, time.time(), settings.criterion, thresholds, target, expected)


class ShareTracker:
    """Realised exit shares from completions, and the accuracy they imply."""

    def __init__(self, calib: Calibration, policy: ExitPolicy) -> None:
        self.counts: Counter[int] = Counter()
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


async def run(settings: ArbiterSettings, stop: asyncio.Event) -> None:
    bundle = load_bundle(settings.bundle)
    calib = bundle.calibration()
    policy = make_policy(settings, calib, bundle.name, epoch=1)
    shares = ShareTracker(calib, policy)
    runtime = Runtime("arbiter", settings.common,
                      heartbeat=lambda hb: replace(hb, stats=shares.stats()))
    async with runtime:
        bus, topics = runtime.bus, runtime.topics
        done = await bus.subscribe(topics.done_all(), maxsize=65536)
        runtime.log.info("exit_policy", model=bundle.name, thresholds=list(policy.thresholds),
                         target=policy.target_accuracy, expected=round(policy.expected_accuracy, 4))

        async def publish_policy() -> None:
            while True:
                try:
                    await bus.publish(topics.exit_policy(bundle.name), policy.encode(), qos=1,
                                      retain=True)
                except OfframpError as exc:
                    runtime.log.warning("policy_not_published", error=str(exc))
                await asyncio.sleep(settings.republish_s)

        async def watch() -> None:
            async for msg in done:
                try:
                    shares.add(Completion.decode(msg.payload).exit_index)
                except WireError:
                    continue

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(publish_policy()), tg.create_task(watch())]
            await stop.wait()
            for t in tasks:
                t.cancel()


__all__ = ["ArbiterSettings", "ShareTracker", "make_policy", "run"]
