"""``offramp publish --video``: frames from a video file generated here and from an RTSP
camera on loopback (GStreamer's RTSP server), kept, scaled, encoded as JPEG, published with ids
from the stream's timestamps; a stream that drops is opened again and what it missed counted;
on a running system every published frame is answered once."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from offramp.bus import Bus, Topics
from offramp.errors import OfframpError
from offramp.local.client import collect, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.local.video import Captured, VideoOptions, VideoReader, parse_size
from offramp.model.bundle import Bundle
from offramp.settings import BusSettings

pytestmark = pytest.mark.tier("inproc")  # the RTSP camera's test is a process test, marked below

HERE = Path(__file__).parent


def write_clip(path: Path, frames: int, fps: int = 30, size: tuple[int, int] = (160, 120)) -> Path:
    """An H.264 MP4 of a bar moving across a dark frame."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            x = (i * 4) % (w - 8)
            img[:, x:x + 8] = (255, 200, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames=45)


async def _read(options: VideoOptions, most: int = 10_000) -> tuple[list[Captured], VideoReader]:
    reader = VideoReader(options)
    got: list[Captured] = []
    async with reader:
        async for frame in reader.frames():
            got.append(frame)
            if len(got) >= most:
                break
    return got, reader


def test_a_file_is_read_at_its_own_rate_capped_scaled_and_encoded_as_jpeg(clip: Path) -> None:
    start = time.monotonic()
    frames, reader = asyncio.run(_read(VideoOptions(str(clip), fps=10, size=(64, 48))))
    took = time.monotonic() - start
    assert len(frames) == 15 and reader.stats.decoded == 45 and reader.stats.over_fps == 30
    assert took >= 1.2  # 45 frames at 30 fps: delivered as a camera would, not at once
    assert [round(f.stream_s, 2) for f in frames[:3]] == [0.0, 0.1, 0.2]
    assert all(f.jpeg[:3] == b"\xff\xd8\xff" and (f.width, f.height) == (64, 48) for f in frames)
    assert reader.stats.reconnects == 0 and not reader.stats.errors


def test_a_looped_file_comes_round_again_with_a_new_pass(clip: Path) -> None:
    frames, _ = asyncio.run(_read(VideoOptions(str(clip), fps=30, loop=True), most=60))
    assert len(frames) == 60
    assert {f.epoch for f in frames} == {0, 1}
    assert len({(f.epoch, round(f.stream_s, 3)) for f in frames}) == 60  # ids never repeat


def test_a_missing_or_broken_video_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OfframpError, match="no such file"):
        VideoOptions(str(tmp_path / "absent.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    frames, reader = asyncio.run(_read(VideoOptions(str(broken))))
    assert frames == [] and reader.stats.errors  # said, not raised in a thread
    with pytest.raises(OfframpError, match="WIDTHxHEIGHT"):
        parse_size("224")
    with pytest.raises(OfframpError, match="1 to 95"):
        VideoOptions(str(broken), quality=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _camera(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["/usr/bin/python3", str(HERE / "rtsp_camera.py"), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
    return proc


@pytest.fixture
def rtsp_port() -> Iterator[int]:
    yield _free_port()


@pytest.mark.tier("broker")
def test_an_rtsp_camera_that_drops_is_opened_again_and_what_it_missed_counted(
        rtsp_port: int) -> None:
    camera = _camera(rtsp_port)
    url = f"rtsp://127.0.0.1:{rtsp_port}/cam"

    async def watch() -> tuple[list[Captured], VideoReader]:
        nonlocal camera
        reader = VideoReader(VideoOptions(url, reconnect_min_s=0.2, reconnect_max_s=1.0,
                                          timeout_s=5))
        got: list[Captured] = []
        async with reader:
            async for frame in reader.frames():
                got.append(frame)
                if len(got) == 10:  # the camera goes away for 1.5 s and comes back
                    camera.kill()
                    camera.wait()
                    await asyncio.sleep(1.5)
                    camera = await asyncio.to_thread(_camera, rtsp_port)
                if len(got) >= 20:
                    break
        return got, reader

    try:
        frames, reader = asyncio.run(asyncio.wait_for(watch(), 60))
    finally:
        camera.kill()
        camera.wait()
    assert len(frames) == 20
    assert frames[0].epoch == 0 and frames[-1].epoch >= 1  # a new connection, new frame ids
    assert reader.stats.reconnects >= 1
    assert reader.stats.missed >= 15  # 15 frames/s for at least the 1.5 s it was gone
    assert (frames[0].width, frames[0].height) == (320, 240)


def test_publish_video_has_every_published_frame_answered_once(
        tiny_bundle: Bundle, prefix: str, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "cam.mp4", frames=60, size=(320, 240))

    async def run(system: LocalSystem) -> tuple[dict[str, object], list[str]]:
        topics = Topics(system.prefix)
        settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix)
        async with Bus(settings, f"test-video-{os.getpid()}") as bus:
            await bus.wait_connected(10)
            await wait_for_workers(bus, topics, system.workers, 60)
            results = await bus.subscribe(topics.results("door"), qos=1, maxsize=10_000)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "offramp.cli", "publish", "--broker", system.url,
                "--prefix", system.prefix, "--source", "door", "--video", str(clip),
                "--size", "64x48", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            summary = json.loads(out.decode().strip().splitlines()[-1])
            got = await collect(results, int(summary["published"]), 20)
            more = await collect(results, 1, 1)  # nothing beyond one answer a frame
        return summary, [r.frame_id for r in got.results + more.results if r.status == "ok"]

    with LocalSystem(tiny_bundle, 1, prefix=prefix) as system:
        summary, answered = asyncio.run(run(system))
    assert summary["published"] == summary["kept"] == 60 and summary["failed"] == 0
    assert summary["skipped_for_pace"] == 0  # 30 frames/s is far under the pace
    assert len(answered) == 60 == len(set(answered))
    assert all("#0@" in fid for fid in answered)
