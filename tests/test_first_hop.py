"""The first hop carries the camera's bytes: the admission-controller checks a frame's header
and forwards it as it came, and the first worker decodes it. On a real broker, with a real
bundle: camera-sized JPEG and PNG frames are answered as offline inference answers the same
decoded input, the bytes on the first hop are counted by an observer, and a frame that only
the worker finds broken gets one ``error`` under its own frame id."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from offramp.bus import Bus, Topics
from offramp.local.client import collect, publish_frames, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.model.frames import decode_frame
from offramp.model.sessions import FullModelRunner
from offramp.settings import BusSettings
from offramp.wire import ActivationPacket, FrameEnvelope, Result

pytestmark = pytest.mark.tier("broker")

ENV = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "3", "OFFRAMP_ARBITER_DISABLE_EXITS": "true"}


def _camera_frame(image: np.ndarray, fmt: str) -> bytes:
    """A 1280x720 frame of ``image`` (a digit, scaled up), as a camera would encode it."""
    big = Image.fromarray(image).resize((1280, 720), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _broken_after_the_header(png: bytes) -> bytes:
    """A PNG whose header is fine (it passes admission) and whose pixel data is cut short."""
    return png[:len(png) // 3]


async def _send(system: LocalSystem, payloads: list[bytes]) -> tuple[list[Result], list[int]]:
    """Publish ``payloads`` in envelopes; the results, and the size of every packet that went
    to segment 1."""
    topics = Topics(system.prefix)
    settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix)
    async with Bus(settings, f"test-first-hop-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        first_hop = await bus.subscribe(topics.act(system.bundle.name, 1) + "/+", maxsize=10_000)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=10_000)
        await publish_frames(bus, topics.ingest("cam-1"), payloads, 50)
        got = await collect(results, len(payloads), 60)
        sizes = []
        while (msg := first_hop.get_nowait()) is not None:
            sizes.append(len(msg.payload))
            assert ActivationPacket.decode(msg.payload).inputs  # the camera's bytes
    return got.results, sizes


def test_camera_frames_travel_as_sent_and_are_answered_as_offline(tiny_bundle: Bundle,
                                                                  prefix: str) -> None:
    digits = load_digits().test
    frames = {f"{fmt}-{i}": _camera_frame(digits.images[i], fmt)
              for i in range(6) for fmt in ("JPEG", "PNG")}
    broken = _broken_after_the_header(frames["PNG-0"])
    payloads = [_wrap(fid, data) for fid, data in frames.items()] + [_wrap("broken", broken)]
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=ENV) as system:
        results, sizes = asyncio.run(_send(system, payloads))
        after = asyncio.run(_send(system, [_wrap("after", frames["PNG-1"])]))[0]
        codes = system.stop()
    by_id = {r.frame_id: r for r in results}
    assert sorted(by_id) == sorted([*frames, "broken"]) and len(results) == len(payloads)
    full = FullModelRunner(tiny_bundle)
    spec = tiny_bundle.manifest.input
    for fid, data in frames.items():
        expected = int(np.argmax(full.run(decode_frame(data, spec)[None])[0]))
        assert by_id[fid].status == "ok" and by_id[fid].label == expected, (fid, by_id[fid])
    assert by_id["broken"].status == "error"
    assert "not a decodable JPEG or PNG" in (by_id["broken"].error or "")
    assert [r.status for r in after] == ["ok"]  # the worker serves on
    # an observer on the first hop: per frame, its encoded bytes and headers, nothing more
    encoded = sum(len(p) for p in payloads)
    assert sum(sizes) <= encoded + 1024 * len(payloads), (sum(sizes), encoded)
    assert Counter(codes.values()) == Counter({0: len(codes)})


def _wrap(frame_id: str, data: bytes) -> bytes:
    """``data`` in an envelope with its frame id (the test names each result)."""
    return FrameEnvelope(frame_id=frame_id, ts=time.time(), image=data).encode()
