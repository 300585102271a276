"""The same client for code without an event loop: :class:`BlockingClient` runs a
:class:`~offramp.client.api.Client` on a loop of its own, in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from offramp.client.api import Client, Frame
from offramp.client.pace import PaceFollower
from offramp.wire import Result

T = TypeVar("T")


class BlockingClient:
    """``with BlockingClient("cam-1", broker="mqtt://gateway:1883") as c: c.submit(frame)``.
    Takes :class:`Client`'s arguments; every method blocks until done."""

    def __init__(self, source: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offramp-client",
                                        daemon=True)
        self._thread.start()
        self._async: Client | None = None
        try:
            self._async = self._call(self._open(source, kwargs))
        except BaseException:
            self._stop_loop()
            raise

    async def _open(self, source: str, kwargs: dict[str, Any]) -> Client:
        return await Client(source, **kwargs).__aenter__()

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def client(self) -> Client:
        if self._async is None:
            raise RuntimeError("the client is closed")
        return self._async

    def submit(self, frame: Frame, **kwargs: Any) -> Result:
        """:meth:`Client.submit`: publish a frame and return its answer."""
        return self._call(self.client.submit(frame, **kwargs))

    def send(self, frame: Frame, **kwargs: Any) -> str | None:
        """:meth:`Client.send`: publish a frame; its answer comes from :meth:`results`."""
        return self._call(self.client.send(frame, **kwargs))

    def follow_rate(self) -> PaceFollower:
        """:meth:`Client.follow_rate`."""
        return self._call(self.client.follow_rate())

    def results(self, timeout_s: float | None = None) -> Iterator[Result]:
        """Answers to frames sent with :meth:`send`, as they arrive; ends when none came for
        ``timeout_s`` (None: waits for ever)."""
        while True:
            try:
                yield self._call(self.client.next_answer(timeout_s))
            except TimeoutError:
                return

    def close(self) -> None:
        if self._async is not None:
            client, self._async = self._async, None
            self._call(client.__aexit__(None, None, None))
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
