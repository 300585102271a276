"""Health and metrics over HTTP for probes and Prometheus: ``GET /livez``, ``/readyz``,
``/metrics`` on ``OFFRAMP_HTTP_PORT`` (0: off). A tiny HTTP/1.1 server on the service's own
event loop, so an answer from ``/livez`` also says the loop is not stuck.

``/readyz`` answers 200 when the service is connected to the broker and holds what it needs
(its readiness check says what is missing otherwise, with 503).

``python -m offramp.node.health [/readyz]`` is the container healthcheck: it asks the service on
``OFFRAMP_HTTP_PORT`` and exits 0 when it answers 200 (stdlib only, cheap enough to run every
few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import structlog

from offramp.node.metrics import CONTENT_TYPE, Metrics

Readiness = Callable[[], str | None]  # None: ready; else what is missing

TEXT = "text/plain; charset=utf-8"
_MAX_REQUEST = 8192
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            503: "Service Unavailable"}


class HealthServer:
    def __init__(self, host: str, port: int, metrics: Metrics, ready: Readiness) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.ready = ready
        self._server: asyncio.Server | None = None
        self.log = structlog.get_logger("offramp.node.health")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=_MAX_REQUEST)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        self.log.info("http_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request: pure, tested without sockets."""
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"only GET and HEAD\n"
        path = path.split("?", 1)[0]
        if path == "/livez":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            missing = self.ready()
            return (200, TEXT, b"ready\n") if missing is None else \
                (503, TEXT, f"not ready: {missing}\n".encode())
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render()
        return 404, TEXT, b"try /livez, /readyz or /metrics\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, ctype, data = 400, TEXT, b"bad request\n"
            else:
                status, ctype, data = self.answer(parts[0], parts[1])
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
            if parts and parts[0] != "HEAD":
                writer.write(data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, UnicodeDecodeError):
            pass  # a bad or slow client gets nothing; the service carries on
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def probe(path: str = "/readyz", port: int | None = None, timeout: float = 2.0) -> tuple[bool, str]:
    """Ask the local service; (healthy, what it said)."""
    port = port if port is not None else int(os.environ.get("OFFRAMP_HTTP_PORT") or 0)
    if not port:
        return False, "OFFRAMP_HTTP_PORT is not set: the service has no HTTP server to ask"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status == 200, reply.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode(errors="replace").strip() or str(exc)
    except (OSError, ValueError) as exc:
        return False, f"no answer on port {port}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    healthy, said = probe(args[0] if args else "/readyz")
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
