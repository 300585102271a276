"""offramp's Python client: send frames of one source, get each frame's one answer.

Frames go to ``ingest/<source>`` as frame envelopes, each with an MQTT v5 response topic
private to this client (``replies/<source>/<client id>``) and its frame id as correlation
data; the admission-controller answers there as well as on ``results/<source>`` (README,
"Answers a client can match"). :meth:`Client.submit` sends one frame and waits for its
answer; :meth:`Client.send` sends without waiting and :meth:`Client.stream` yields the answers
as they come; :meth:`Client.follow_rate` makes :meth:`send` skip frames above the rate the
system takes the source's frames at.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import structlog

from offramp.bus import Bus, Message, Subscription, Topics, check_name
from offramp.client.pace import PaceFollower, follow_pace
from offramp.errors import OfframpError, WireError
from offramp.node.log import configure_logging
from offramp.settings import BusSettings
from offramp.wire import FrameEnvelope, Result, Tensor, read_results

Frame = bytes | bytearray | np.ndarray | Any  # encoded image bytes, an array, or a PIL image


def encode_frame(frame: Frame) -> tuple[bytes | None, np.ndarray | None]:
    """(image bytes, None) or (None, model-input tensor) for an envelope. Encoded bytes (JPEG,
    PNG) go as they are; a uint8 array (H, W, 3) or (H, W), or a PIL image, as PNG (lossless);
    a float array is the model's input itself."""
    if isinstance(frame, bytes | bytearray):
        return bytes(frame), None
    if isinstance(frame, np.ndarray):
        if frame.dtype == np.uint8:
            from PIL import Image

            return _png(Image.fromarray(frame)), None
        if np.issubdtype(frame.dtype, np.floating):
            return None, np.ascontiguousarray(frame, dtype=np.float32)
        raise OfframpError(f"a frame array must be uint8 pixels or a float model input, not "
                           f"{frame.dtype}")
    if hasattr(frame, "save") and hasattr(frame, "mode"):  # a PIL image
        return _png(frame), None
    raise OfframpError(f"a frame is JPEG/PNG bytes, a numpy array or a PIL image, not "
                       f"{type(frame).__name__}")


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Client:
    """An async client of one source. Use as ``async with Client("cam-1", broker=...) as c:``.

    ``broker``: ``mqtt://host:port`` (or ``mqtts://``, with ``user:pass@``), or full
    :class:`~offramp.settings.BusSettings`; ``prefix``: the system's topic prefix;
    ``answers``: how many answers :meth:`stream` holds before the oldest are dropped (counted
    in ``answers_dropped``). Unless the program configured structlog, the client logs its
    warnings (a lost connection, say) to stderr."""

    def __init__(self, source: str, *, broker: str | BusSettings, prefix: str = "offramp/v1",
                 client_id: str | None = None, answers: int = 10_000,
                 connect_timeout_s: float = 10.0) -> None:
        self.source = check_name(source, "source")
        self.settings = broker if isinstance(broker, BusSettings) else \
            BusSettings(broker_url=broker if "://" in broker else f"mqtt://{broker}",
                        topic_prefix=prefix)
        self.topics = Topics(self.settings.topic_prefix)
        self.client_id = check_name(client_id or f"offramp-client-{os.getpid()}-"
                                    f"{secrets.token_hex(3)}", "client id")
        self.reply_topic = self.topics.replies(self.source, self.client_id)
        self.connect_timeout_s = connect_timeout_s
        self.pace: PaceFollower | None = None
        self.answers_dropped = 0
        self.undecodable = 0  # replies that were not a result or a refusal
        if not structlog.is_configured():  # a program's stdout is its own: warnings to stderr
            configure_logging("warning")
        self._bus = Bus(self.settings, self.client_id)
        self._ids = itertools.count()
        self._waiting: dict[str, asyncio.Future[Result]] = {}
        self._answers: asyncio.Queue[Result] = asyncio.Queue(answers)
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription[Message]] = []

    async def __aenter__(self) -> Client:
        await self._bus.__aenter__()
        try:
            await self._bus.wait_connected(self.connect_timeout_s)
            replies = await self._bus.subscribe(self.reply_topic, qos=1, maxsize=65536)
        except BaseException:
            await self._bus.__aexit__(None, None, None)
            raise
        self._subs.append(replies)
        self._tasks.append(asyncio.create_task(self._read(replies)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            await sub.close()
        for fut in self._waiting.values():
            fut.cancel()
        await self._bus.__aexit__(None, None, None)

    async def follow_rate(self) -> PaceFollower:
        """Follow the source's pace from now on: :meth:`send` skips (returns None for) a frame
        above it, :meth:`submit` waits for room. Returns the follower (its ``rate_hz``,
        ``sent`` and ``skipped``)."""
        if self.pace is None:
            self.pace, task, sub = await follow_pace(self._bus, self.topics, self.source)
            self._tasks.append(task)
            self._subs.append(sub)
        return self.pace

    async def send(self, frame: Frame, *, frame_id: str | None = None,
                   deadline_s: float | None = None, label: int | None = None) -> str | None:
        """Publish one frame (QoS 1); return its frame id, or None when it was skipped for
        the pace (:meth:`follow_rate`). Its answer comes from :meth:`stream`."""
        if self.pace is not None and not self.pace.take():
            return None
        return await self._publish(frame, frame_id, deadline_s, label)

    async def submit(self, frame: Frame, *, frame_id: str | None = None,
                     deadline_s: float | None = None, label: int | None = None,
                     timeout_s: float = 30.0) -> Result:
        """Publish one frame and return its answer: ``status`` ``ok`` with the prediction, or
        ``dropped``, ``expired`` or ``error`` with the reason. Raises TimeoutError when none
        came within ``timeout_s``; an answer that comes after that goes to :meth:`stream`."""
        if self.pace is not None:
            await self.pace.wait()
        fid = frame_id or self._new_id()
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting[fid] = fut
        try:
            await self._publish(frame, fid, deadline_s, label)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiting.pop(fid, None)

    async def stream(self) -> AsyncIterator[Result]:
        """The answers to frames sent with :meth:`send`, as they arrive."""
        while True:
            yield await self._answers.get()

    async def next_answer(self, timeout_s: float | None = None) -> Result:
        """The next answer to a frame sent with :meth:`send`; TimeoutError when none came
        within ``timeout_s`` (None: wait for ever)."""
        return await asyncio.wait_for(self._answers.get(), timeout_s)

    def _new_id(self) -> str:
        return f"{self.client_id}-{next(self._ids)}"

    async def _publish(self, frame: Frame, frame_id: str | None, deadline_s: float | None,
                       label: int | None) -> str:
        fid = frame_id or self._new_id()
        image, tensor = encode_frame(frame)
        now = time.time()
        payload = FrameEnvelope(frame_id=fid, ts=now, image=image,
                                tensor=Tensor.encode(tensor) if tensor is not None else None,
                                deadline=now + deadline_s if deadline_s else None,
                                label=label).encode()
        await self._bus.publish(self.topics.ingest(self.source), payload, qos=1,
                                response_topic=self.reply_topic,
                                correlation_data=fid.encode())
        return fid

    async def _read(self, replies: Subscription[Message]) -> None:
        async for msg in replies:
            try:
                results = read_results(msg.payload)
            except WireError:
                self.undecodable += 1
                continue
            for result in results:
                fut = self._waiting.pop(result.frame_id, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(result)
                    continue
                if self._answers.full():
                    self._answers.get_nowait()
                    self.answers_dropped += 1
                self._answers.put_nowait(result)
