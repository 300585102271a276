"""``offramp publish`` against a running system on a real broker: deadlines counted from the
send, the served model's dataset and no other, files matched to their frame ids."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from offramp.bus import Bus, Topics
from offramp.local.client import collect, png_bytes, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings
from offramp.wire import Result

pytestmark = pytest.mark.tier("broker")

FAST = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "1.5", "OFFRAMP_ARBITER_REPUBLISH_S": "0.5"}


async def _publish(system: LocalSystem, *args: str, expect: int = 0
                   ) -> tuple[int, str, str, list[Result]]:
    """Run ``offramp publish`` against ``system``; return its exit code, stdout, stderr and the
    results of ``expect`` frames."""
    topics = Topics(system.prefix)
    settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix)
    async with Bus(settings, f"test-publish-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=10_000)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "offramp.cli", "publish", "--broker", system.url,
            "--prefix", system.prefix, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        got = await collect(results, expect, 30) if expect else None
    return (proc.returncode or 0, out.decode(), err.decode(), got.results if got else [])


def test_publish_sends_the_served_dataset_stamps_deadlines_at_send_and_maps_files(
        tiny_bundle: Bundle, prefix: str, tmp_path: Path) -> None:
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=FAST) as system:
        # 60 frames at 50/s take 1.2 s to send: a deadline stamped before the first one went
        # would expire the last ones; stamped at each send, every frame makes 1000 ms
        rc, _, err, results = asyncio.run(_publish(
            system, "--rate", "50", "--count", "60", "--deadline-ms", "1000", expect=60))
        assert rc == 0, err
        assert "test split of digits (the served model" in err
        assert sorted(r.status for r in results) == ["ok"] * 60, [r.status for r in results]

        # another dataset than the served model's is refused before anything is sent
        rc, _, err, _ = asyncio.run(_publish(system, "--dataset", "fashion-mnist"))
        assert rc == 2 and "trained on digits, not fashion-mnist" in err, err
        assert "Traceback" not in err
        rc, _, err, _ = asyncio.run(_publish(system, "--count", "400"))
        assert rc == 2 and "has 360 images: add --loop" in err, err

        folder = tmp_path / "camera"
        folder.mkdir()
        for i, image in enumerate(load_digits().test.images[:3]):
            (folder / f"shot-{i}.png").write_bytes(png_bytes(image))
        rc, out, err, results = asyncio.run(_publish(system, "--dir", str(folder), "--rate", "0",
                                                     expect=3))
        assert rc == 0, err
        mapping = {row["frame_id"]: Path(row["file"]).name
                   for row in map(json.loads, out.splitlines())}
        assert sorted(mapping.values()) == ["shot-0.png", "shot-1.png", "shot-2.png"]
        assert {r.frame_id for r in results} == set(mapping)
        assert all(r.status == "ok" for r in results)
        rc, _, err, _ = asyncio.run(_publish(system, "--dir", str(folder / "shot-0.png")))
        assert rc == 2 and "not a folder" in err and "Traceback" not in err
