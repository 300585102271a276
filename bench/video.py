"""``make bench-video``: a camera's stream through the system as users run it.

A 1280x720 H.264 file at 30 frames/s (``OFFRAMP_BENCH_VIDEO_S``, 60 s, generated here with
PyAV: a moving pattern over noise, so that each JPEG costs what a real one does) is sent by
``offramp publish --video`` as it is (no ``--size``: each frame a 1280x720 JPEG) to the demo
system (``offramp up --workers 2``'s, default settings). The first worker decodes each JPEG at
a reduced scale and answers it. Reported: frames published, answered once, answered twice,
never answered; statuses; latency in the system (the result's ``latency_ms.total``: p50, p99);
what the publisher decoded and kept. Run three times; the figures are the median of the runs, with their
spread.

Keys: ``answered_once_share`` (frames answered exactly once / frames published),
``never_answered``, ``answered_twice``, ``ok_share``, ``p99_ms``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import av
import numpy as np

from bench.common import Conditions, percentile_ms, write_result
from bench.overload import demo_bundle
from offramp.bus import Bus, Topics
from offramp.local.client import wait_for_plan, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.settings import BusSettings
from offramp.wire import read_results

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("OFFRAMP_BENCH_VIDEO_S", "60"))
RUNS = int(os.environ.get("OFFRAMP_BENCH_VIDEO_RUNS", "3"))
FPS = 30
WIDTH, HEIGHT = 1280, 720
SETTLE_S = 10.0


def write_clip(path: Path, seconds: float) -> Path:
    """An H.264 file of a bright square moving over noise (noise: JPEGs of realistic size)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 80, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(int(seconds * FPS)):
            img = np.roll(noise, i * 7, axis=1)
            x, y = (i * 13) % (WIDTH - 200), (i * 5) % (HEIGHT - 200)
            img[y:y + 200, x:x + 200] = (240, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


async def one_run(system: LocalSystem, clip: Path, source: str) -> dict[str, Any]:
    topics = Topics(system.prefix)
    async with Bus(BusSettings(broker_url=system.url), f"bench-video-{source}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        await wait_for_plan(bus, topics, 60)
        results = await bus.subscribe(topics.results(source), qos=1, maxsize=1_000_000)
        answers: list[tuple[str, str, float]] = []  # frame id, status, latency (s)

        async def read() -> None:
            async for msg in results:
                for r in read_results(msg.payload):
                    answers.append((r.frame_id, r.status, r.latency_ms.get("total", 0.0) / 1000))

        reader = asyncio.create_task(read())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "offramp.cli", "publish", "--broker", system.url,
            "--source", source, "--video", str(clip), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        out, err = await proc.communicate()
        if proc.returncode:
            raise SystemExit(f"bench-video: publish failed: {err.decode()[-2000:]}")
        summary = json.loads(out.decode().strip().splitlines()[-1])
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline and len(answers) < summary["published"]:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        reader.cancel()
    per_frame = Counter(fid for fid, *_ in answers)
    published = int(summary["published"])
    latency = [lat for _, status, lat in answers if status == "ok"]
    return {"published": published, "answered_once": sum(1 for n in per_frame.values() if n == 1),
            "answered_twice": sum(1 for n in per_frame.values() if n > 1),
            "never_answered": published - len(per_frame),
            "status": dict(Counter(status for _, status, _ in answers)),
            "p50_ms": percentile_ms(latency, 50) if latency else None,
            "p99_ms": percentile_ms(latency, 99) if latency else None,
            "publisher": {k: summary[k] for k in ("seconds", "decoded", "kept", "behind",
                                                  "skipped_for_pace", "failed")}}


def main() -> None:
    conditions = Conditions.now()
    bundle = demo_bundle()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        clip = write_clip(Path(tmp) / "cam.mp4", SECONDS)
        size = clip.stat().st_size
        with LocalSystem(bundle, 2, env={"OFFRAMP_LOG_LEVEL": "warning"}) as system:
            for i in range(RUNS):
                runs.append(asyncio.run(one_run(system, clip, f"cam-{i}")))
                print("run", i, runs[-1], flush=True)
    share = [r["answered_once"] / r["published"] for r in runs]
    ok = [r["status"].get("ok", 0) / r["published"] for r in runs]
    p99 = [r["p99_ms"] or 0.0 for r in runs]
    write_result("video", {
        "video": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "seconds": SECONDS,
                  "h264_bytes": size},
        "bundle": bundle.name, "workers": 2, "runs": runs,
        "answered_once_share": statistics.median(share),
        "answered_once_share_spread": [min(share), max(share)],
        "never_answered": max(r["never_answered"] for r in runs),
        "answered_twice": max(r["answered_twice"] for r in runs),
        "ok_share": statistics.median(ok),
        "p99_ms": statistics.median(p99), "p99_ms_spread": [min(p99), max(p99)],
        "goals": {"answered_once_share": "1.0"},
    }, conditions)


if __name__ == "__main__":
    main()
