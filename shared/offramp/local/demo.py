"""``make demo`` / ``offramp demo``: build the demo bundle if absent (a directory that holds
another bundle is used as it is), start the system, publish test images of the bundle's own
dataset, and print what came back. Exits 0 only if every frame got one result."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from offramp.bus import Bus, Topics
from offramp.errors import OfframpError
from offramp.local.client import collect, envelope, publish_frames, wait_for_workers
from offramp.local.launcher import interrupt_on_stop_signals
from offramp.local.system import LocalSystem
from offramp.settings import BusSettings
from offramp.wire import Result

MALFORMED = [b"this is not an image", b"\x89PNG\r\n\x1a\n-truncated-", b"\x93NUMPY garbage"]
MAX_FRAMES = 500  # test images published (the digits test split has 360)


def run_demo(bundle_dir: Path = Path("bundles/demo"), workers: int = 2, rate: float = 150.0,
             source: str = "cam-1") -> int:
    from offramp.ml.build import build, preset
    from offramp.ml.data import load_dataset
    from offramp.model.bundle import BundleError, load_bundle

    interrupt_on_stop_signals()  # a SIGTERM stops the services too, as Ctrl-C does

    console = Console()
    t0 = time.monotonic()
    try:
        bundle, state = load_bundle(bundle_dir), "given"
        if bundle.manifest.metrics.get("preset_name") == preset("demo").name:
            bundle, metrics = build(preset("demo"), bundle_dir)  # rebuilt if its recipe changed
            state = "cached" if metrics["cached"] else "trained now"
    except BundleError:
        console.print(f"[bold]offramp demo[/]: building the demo model into {bundle_dir} (once)")
        bundle, _ = build(preset("demo"), bundle_dir)
        state = "trained now"
    metrics = bundle.manifest.metrics
    dataset = str(metrics.get("dataset", "digits"))
    size = bundle.manifest.input.height
    console.print(f"[bold]offramp demo[/]: bundle {bundle.name} ({state}, {size}x{size}, "
                  f"{dataset}) ready in {time.monotonic() - t0:.0f} s; "
                  f"{bundle.num_segments} segments over {workers} workers")
    test = load_dataset(dataset, metrics.get("data_dir"), size, splits=("test",)).test
    labels = {f"test-{i}": int(y) for i, y in enumerate(test.labels[:MAX_FRAMES])}
    payloads = [envelope(f, image=test.images[i], label=labels[f])
                for i, f in enumerate(labels)] + MALFORMED
    with LocalSystem(bundle, workers) as system:
        topics = Topics(system.prefix)

        async def drive() -> tuple[list[Result], float]:
            async with Bus(BusSettings(broker_url=system.url), f"offramp-demo-{os.getpid()}") as bus:
                await bus.wait_connected(10)
                await wait_for_workers(bus, topics, workers, 60)
                policy = await bus.subscribe(topics.exit_policy(bundle.name))
                await asyncio.wait_for(policy.get(), 30)
                results = await bus.subscribe(topics.results(source), qos=1, maxsize=100_000)
                console.print(f"publishing {len(payloads)} frames ({len(MALFORMED)} malformed) "
                              f"to {topics.ingest(source)} at {rate:.0f}/s")
                start = time.perf_counter()
                await publish_frames(bus, topics.ingest(source), payloads, rate)
                got = await collect(results, len(payloads), 60)
                extra = await collect(results, len(payloads), 1.0)  # duplicates would show here
                return got.results + extra.results, got.last - start

        try:
            results, span = asyncio.run(drive())
        except (TimeoutError, OfframpError) as exc:
            console.print(system.logs())
            raise OfframpError(f"demo failed: {exc}") from None
        codes = system.stop()
    return _summary(console, results, labels, len(payloads), span, codes,
                    time.monotonic() - t0, f"{dataset} test split")


def _summary(console: Console, results: list[Result], labels: dict[str, int], sent: int,
             span: float, codes: dict[str, int | None], wall: float, what: str) -> int:
    status = Counter(r.status for r in results)
    ok = [r for r in results if r.status == "ok"]
    correct = sum(1 for r in ok if labels.get(r.frame_id) == r.label)
    exits = Counter(r.exit_index or 0 for r in ok)
    lat = np.array([r.latency_ms["total"] for r in ok]) if ok else np.zeros(1)
    per_frame = Counter(r.frame_id for r in results if r.frame_id in labels)
    table = Table(title=f"offramp demo: the {what} through the distributed model")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("frames published", str(sent)),
        ("results received", str(len(results))),
        ("results by status", ", ".join(f"{k} {v}" for k, v in sorted(status.items()))),
        ("accuracy vs labels (ok results)", f"{correct / max(1, len(ok)):.4f}"),
        ("exit shares", ", ".join(f"exit {k}: {exits[k] / max(1, len(ok)):.2f}"
                                  for k in sorted(exits))),
        ("throughput", f"{len(results) / max(span, 1e-9):.0f} results/s"),
        ("latency p50 / p99", f"{np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} ms"),
        ("services stopped cleanly", str(all(c == 0 for c in codes.values()))),
        ("wall time", f"{wall:.0f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    one_each = len(results) == sent and all(n == 1 for n in per_frame.values()) \
        and len(per_frame) == len(labels)
    if not one_each or status["error"] != len(MALFORMED) or not all(c == 0 for c in codes.values()):
        console.print("[red]demo failed: not exactly one result per frame, or a service did not "
                      "stop cleanly[/]")
        return 1
    console.print("[green]every frame got exactly one result[/]")
    return 0
