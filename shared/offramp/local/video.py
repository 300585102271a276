"""Frames from a camera: a video file, a V4L2 device (``/dev/videoN``) or a network stream
(``rtsp://``, ``http://``...), decoded with PyAV (FFmpeg) and encoded as JPEG, for
``offramp publish --video``.

Decoding runs in a thread of its own, which hands each kept frame to the event loop through a
queue of two: when the sender falls behind, the oldest frame goes, as a camera's buffer
overwrites it (counted, ``behind``). A file is read at its own frame rate, as a camera would
deliver it, and from the start again with ``loop``. A stream that fails to open, drops or ends
is opened again after a backoff (``reconnect_min_s``, doubling to ``reconnect_max_s``); the
frames it would have delivered meanwhile are counted as ``missed`` (outage x frame rate).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offramp.errors import OfframpError

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://",
                "srt://")
QUEUE = 2  # frames waiting for the sender: a camera's buffer, not a backlog


@dataclass(frozen=True)
class VideoOptions:
    """What to read and how each kept frame is sent."""

    url: str
    fps: float = 0.0  # keep at most this many frames a second (0: every frame)
    size: tuple[int, int] | None = None  # (width, height) to scale to (None: as decoded)
    quality: int = 85  # JPEG quality, 1..95
    loop: bool = False  # a file: from the start again at its end
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    timeout_s: float = 10.0  # opening, and reading a live stream, fail after this long

    def __post_init__(self) -> None:
        if self.fps < 0:
            raise OfframpError(f"--fps {self.fps}: frames per second, 0 for every frame")
        if not 1 <= self.quality <= 95:
            raise OfframpError(f"--jpeg-quality {self.quality}: 1 to 95")
        if self.size is not None and min(self.size) < 1:
            raise OfframpError(f"--size {self.size[0]}x{self.size[1]}: at least 1x1")
        if self.kind == "file" and not Path(self.url).is_file():
            raise OfframpError(f"--video {self.url}: no such file (a camera is /dev/videoN "
                               "or a URL such as rtsp://host/path)")

    @property
    def kind(self) -> str:
        """``file``, ``device`` (V4L2) or ``stream``."""
        if self.url.startswith("/dev/video"):
            return "device"
        if self.url.startswith(LIVE_SCHEMES):
            return "stream"
        return "file"


@dataclass(frozen=True)
class Captured:
    """One kept frame: its JPEG, its time in the stream (seconds), when it was captured (Unix
    seconds), and which pass of a looped file (or which connection of a stream) it came from."""

    jpeg: bytes
    stream_s: float
    wall: float
    epoch: int
    width: int
    height: int


@dataclass
class VideoStats:
    decoded: int = 0  # frames decoded
    kept: int = 0  # ... handed to the sender
    over_fps: int = 0  # ... left out for --fps
    behind: int = 0  # ... overwritten while the sender was behind
    reconnects: int = 0
    missed: int = 0  # frames a stream would have delivered while it was down
    errors: list[str] = field(default_factory=list)  # the last few, newest last

    def error(self, text: str) -> None:
        self.errors = [*self.errors[-4:], text]


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (for ``--size``)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise OfframpError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 224x224") from None
    if w < 1 or h < 1:
        raise OfframpError(f"--size {text!r}: at least 1x1")
    return w, h


class VideoReader:
    """Reads ``options.url`` in a thread; :meth:`frames` yields what it keeps. Use as
    ``async with VideoReader(options) as reader: async for frame in reader.frames(): ...``."""

    def __init__(self, options: VideoOptions, log: Any = None) -> None:
        self.o = options
        self.log = log
        self.stats = VideoStats()
        self._stop = threading.Event()
        self._queue: asyncio.Queue[Captured | None] = asyncio.Queue(QUEUE + 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def __aenter__(self) -> VideoReader:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="offramp-video", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.o.timeout_s + 1)

    async def frames(self) -> AsyncIterator[Captured]:
        """Kept frames until the video ends (a file without ``loop``) or the reader stops."""
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame

    # -- the decoding thread ------------------------------------------------------------------
    def _hand(self, item: Captured | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: Captured | None) -> None:
        if item is not None and self._queue.qsize() >= QUEUE:
            self._queue.get_nowait()
            self.stats.behind += 1
        self._queue.put_nowait(item)

    def _run(self) -> None:
        try:
            self._read_all()
        except Exception as exc:  # said to the sender, which ends
            self.stats.error(f"{type(exc).__name__}: {exc}")
        finally:
            self._hand(None)

    def _read_all(self) -> None:
        import av

        delay = self.o.reconnect_min_s
        epoch = 0
        down_since: float | None = None
        fps_seen = 0.0
        while not self._stop.is_set():
            try:
                got, fps_seen, ended = self._read_once(av, epoch, fps_seen, down_since)
            except (av.FFmpegError, OSError) as exc:
                got, ended = 0, False
                self.stats.error(f"{type(exc).__name__}: {exc}")
                self._say("video_error", error=str(exc), url=self.o.url)
            if got:
                delay = self.o.reconnect_min_s
                down_since = None
            if self._stop.is_set():
                return
            if self.o.kind == "file" and ended:
                if not self.o.loop:
                    return
                epoch += 1
                continue
            if self.o.kind == "file" and not got:
                raise OfframpError(f"--video {self.o.url}: no video frame could be read "
                                   f"({'; '.join(self.stats.errors[-1:]) or 'empty'})")
            # a live source dropped or ended: open it again after a backoff
            down_since = down_since or time.time()
            self.stats.reconnects += 1
            epoch += 1
            self._say("video_reconnect", url=self.o.url, in_s=round(delay, 2))
            self._stop.wait(delay)
            delay = min(2 * delay, self.o.reconnect_max_s)

    def _read_once(self, av: Any, epoch: int, fps_seen: float, down_since: float | None
                   ) -> tuple[int, float, bool]:
        """Open, decode until the end or an error; (frames kept, frame rate, ended cleanly)."""
        options = {"rtsp_transport": "tcp"} if self.o.url.startswith("rtsp") else {}
        fmt = "v4l2" if self.o.kind == "device" else None
        with av.open(self.o.url, format=fmt, options=options,
                     timeout=(self.o.timeout_s, self.o.timeout_s)) as container:
            if not container.streams.video:
                raise OfframpError(f"--video {self.o.url}: it holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps_seen = float(rate) if rate else fps_seen
            got = 0
            first_t: float | None = None
            started = time.monotonic()
            last_kept: float | None = None
            for frame in container.decode(stream):
                if self._stop.is_set():
                    return got, fps_seen, False
                self.stats.decoded += 1
                now = time.time()
                t = float(frame.time) if frame.time is not None else now
                if first_t is None:
                    first_t = t
                    if down_since is not None and fps_seen:
                        self.stats.missed += int((now - down_since) * fps_seen)
                if self.o.kind == "file":  # as a camera delivers it: in real time
                    self._stop.wait(max(0.0, started + (t - first_t) - time.monotonic()))
                if self.o.fps and last_kept is not None and t - last_kept < 0.999 / self.o.fps:
                    self.stats.over_fps += 1
                    continue
                last_kept = t
                self._hand(self._encode(frame, t, epoch))
                self.stats.kept += 1
                got += 1
            return got, fps_seen, True

    def _encode(self, frame: Any, t: float, epoch: int) -> Captured:
        if self.o.size is not None:
            frame = frame.reformat(width=self.o.size[0], height=self.o.size[1])
        image = frame.to_image()
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.o.quality)
        return Captured(buf.getvalue(), t, time.time(), epoch, image.width, image.height)

    def _say(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log(event, **fields)
