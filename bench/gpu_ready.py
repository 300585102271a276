"""How long a segment-worker takes from its start until its /readyz says ready, and what it
said on the way: ``make bench-gpu``'s ``ready_s``.

A real worker process on a private broker, hosting every segment of a bundle, with an exit
policy already retained there (a worker is ready only once it has one; any bundle will do, a
calibrated one or not). The time covers the
interpreter's start, imports, the broker connection, and every segment's session created and
run twice at the micro-batch: cuDNN's plans, the CUDA graph's capture, TensorRT's engines. The
worker logs ``worker_ready`` once the last segment is warm; a /readyz that said ready before that
line was written would let traffic reach cold sessions, and is reported as such.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from offramp.bus import Bus, Topics
from offramp.local.broker import LocalBroker, free_port
from offramp.local.launcher import ProcessGroup
from offramp.model.bundle import Bundle
from offramp.node.health import probe
from offramp.settings import BusSettings
from offramp.wire import ExitPolicy

POLL_S = 0.01
PREFIX = "bench-ready"


def ready_time(bundle: Bundle, device: str, batch: int, timeout_s: float = 600.0) -> dict[str, Any]:
    """``ready_s`` and the readiness answers seen, each with when it was first seen."""
    with tempfile.TemporaryDirectory(prefix="offramp-ready-") as tmp, \
            LocalBroker() as broker:
        logdir = Path(tmp)
        asyncio.run(_retain_policy(broker.url, bundle))
        group = ProcessGroup(logdir, {
            "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": PREFIX,
            "OFFRAMP_LOG_FORMAT": "json", "OFFRAMP_WORKER_BUNDLE": str(bundle.root)})
        try:
            port = free_port()
            t0 = time.monotonic()
            worker = group.add("segment-worker", "worker-1", {
                "OFFRAMP_WORKER_SEGMENTS": ",".join(str(s.index) for s in bundle.manifest.segments),
                "OFFRAMP_WORKER_DEVICE": device, "OFFRAMP_WORKER_BATCH_MAX": str(batch),
                "OFFRAMP_HTTP_PORT": str(port)})
            said: list[tuple[float, str]] = []
            while True:
                ok, what = probe(port=port, timeout=1.0)
                elapsed = time.monotonic() - t0
                what = "no answer yet" if what.startswith("no answer") else what
                if not said or said[-1][1] != what:
                    said.append((round(elapsed, 3), what))
                if ok:
                    break
                log = (logdir / "worker-1.log").read_text(errors="replace")
                if not worker.alive:
                    raise RuntimeError(f"the worker exited before it was ready:\n{log[-4000:]}")
                if elapsed > timeout_s:
                    raise RuntimeError(f"the worker was not ready within {timeout_s:.0f} s; "
                                       f"/readyz said {said}; its log:\n{log[-4000:]}")
                time.sleep(POLL_S)
            events = _events(logdir / "worker-1.log")
        finally:
            group.stop()
    started = events.get("worker_ready", {})
    return {"ready_s": said[-1][0], "said": said,
            "ready_after_warm": "worker_ready" in events,
            "providers": started.get("providers"), "static_batch": started.get("static_batch"),
            "device_unavailable": events.get("device_unavailable")}


async def _retain_policy(url: str, bundle: Bundle) -> None:
    """Exits closed: readiness needs a policy, not a particular one."""
    policy = ExitPolicy(model=bundle.name, epoch=1, ts=time.time(), criterion="confidence",
                        thresholds=tuple([2.0] * (bundle.num_segments - 1)))
    async with Bus(BusSettings(broker_url=url), "bench-ready-policy") as bus:
        await bus.wait_connected(10)
        await bus.publish(Topics(PREFIX).exit_policy(bundle.name), policy.encode(), qos=1,
                          retain=True)


def _events(path: Path) -> dict[str, dict[str, Any]]:
    """The first log record of each event (JSON lines; other lines are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            out.setdefault(str(record["event"]), record)
    return out
