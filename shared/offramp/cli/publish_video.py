"""``offramp publish --video SOURCE``: a camera's frames to an ingest topic.

SOURCE is a video file, a V4L2 camera (``/dev/videoN``) or a stream URL (``rtsp://...``).
Each kept frame goes as a frame envelope holding its JPEG, stamped with the time it was
captured, its frame id made from the stream's timestamp (``<run>#<pass>@<seconds>``). With the
pace followed (the default), a frame above the rate the system takes the source's frames at is
skipped here, at the camera, instead of crossing the uplink to be answered ``dropped``.
Progress goes to stderr every few seconds; the summary, one JSON line, to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from offramp.bus import MessageBus, Topics
from offramp.bus.outbox import Outbox
from offramp.client.pace import PaceFollower
from offramp.errors import BusError
from offramp.local.video import Captured, VideoOptions, VideoReader, parse_size
from offramp.wire import FrameEnvelope

PROGRESS_S = 5.0
WINDOW = 32  # QoS 1 publishes in flight at once


def add_video_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default=None, metavar="SOURCE",
                   help="send a camera's frames: a video file, /dev/videoN or a stream URL "
                        "(rtsp://, http://...), decoded with PyAV and sent as JPEG")
    p.add_argument("--fps", type=float, default=0.0,
                   help="--video: keep at most this many frames a second (0: every frame)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="--video: scale each frame to this size before encoding it (none: as "
                        "decoded; the model's input size saves the most uplink)")
    p.add_argument("--jpeg-quality", type=int, default=85, help="--video: JPEG quality, 1-95")
    p.add_argument("--reconnect-max-s", type=float, default=10.0,
                   help="--video: longest wait between attempts to open a stream again (the "
                        "first is 0.5 s, doubling)")


@dataclass
class Sent:
    published: int = 0
    skipped_for_pace: int = 0
    failed: int = 0


@dataclass
class Summary:
    """What ``publish --video`` did (printed as one JSON line)."""

    source: str
    video: str
    seconds: float
    published: int
    skipped_for_pace: int
    failed: int
    decoded: int
    kept: int
    over_fps: int
    behind: int
    reconnects: int
    missed: int
    last_error: str | None

    def json(self) -> str:
        return json.dumps(asdict(self))


def video_options(args: argparse.Namespace) -> VideoOptions:
    return VideoOptions(args.video, fps=args.fps, size=args.size, quality=args.jpeg_quality,
                        loop=args.loop, reconnect_max_s=args.reconnect_max_s)


def frame_id(run: str, frame: Captured) -> str:
    return f"{run}#{frame.epoch}@{frame.stream_s:.3f}"


async def publish_video(bus: MessageBus, topics: Topics, source: str, options: VideoOptions,
                        *, run: str, count: int, deadline_s: float | None,
                        pace: PaceFollower | None) -> Summary:
    """Send the kept frames of ``options.url`` until it ends or ``count`` are published
    (0: no limit); return the summary."""
    sent = Sent()
    topic = topics.ingest(source)

    def say(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)

    async def one(frame: Captured) -> None:
        env = FrameEnvelope(frame_id=frame_id(run, frame), ts=frame.wall, image=frame.jpeg,
                            deadline=frame.wall + deadline_s if deadline_s else None)
        try:
            await bus.publish(topic, env.encode(), qos=1)
        except BusError as exc:
            sent.failed += 1
            say("publish_failed", error=str(exc))

    start = next_progress = time.monotonic()
    reader = VideoReader(options, log=say)
    async with reader, Outbox(WINDOW, grace_s=None) as outbox:
        async for frame in reader.frames():
            if pace is not None and not pace.take():
                sent.skipped_for_pace += 1
            else:
                await outbox.send(one(frame))
                sent.published += 1
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_S
                say("progress", seconds=round(time.monotonic() - start, 1), **asdict(sent),
                    pace_hz=pace.rate_hz if pace else None, **_stats(reader))
            if count and sent.published >= count:
                break
    return Summary(source=source, video=options.url,
                   seconds=round(time.monotonic() - start, 2), **asdict(sent), **_stats(reader))


def _stats(reader: VideoReader) -> dict[str, Any]:
    s = reader.stats
    return {"decoded": s.decoded, "kept": s.kept, "over_fps": s.over_fps, "behind": s.behind,
            "reconnects": s.reconnects, "missed": s.missed,
            "last_error": s.errors[-1] if s.errors else None}
