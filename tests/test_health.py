"""Health and metrics: the Prometheus text format, the HTTP endpoints on a real socket, and a
real service answering them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from offramp.local.launcher import ProcessGroup
from offramp.model.bundle import Bundle
from offramp.node.health import HealthServer, probe
from offramp.node.metrics import Metrics
from offramp.settings import BusSettings

pytestmark = pytest.mark.tier("inproc")


def test_metrics_render_in_prometheus_text_format() -> None:
    reg = Metrics()
    c = reg.counter("offramp_results_total", "Results", ["source", "status"])
    c.labels(source="cam-1", status="ok").inc()
    c.labels(source="cam-1", status="ok").inc(2)
    c.labels(source='we"ird', status="error").inc()
    h = reg.histogram("offramp_latency_seconds", "Latency", (0.1, 1.0), ["source"])
    for v in (0.05, 0.5, 5.0):
        h.labels(source="cam-1").observe(v)
    queued = {2: 3}
    reg.on_collect(lambda r: [r.gauge("offramp_queue_length", "Queued", n, segment=s)
                              for s, n in queued.items()])
    reg.on_collect(lambda r: r.counter("offramp_samples_total", "Samples", 41, segment=2))
    text = reg.render().decode()
    assert "# TYPE offramp_results_total counter" in text
    assert 'offramp_results_total{source="cam-1",status="ok"} 3.0' in text
    assert 'offramp_results_total{source="we\\"ird",status="error"} 1.0' in text
    assert 'offramp_queue_length{segment="2"} 3.0' in text
    assert 'offramp_latency_seconds_bucket{le="0.1",source="cam-1"} 1.0' in text
    assert 'offramp_latency_seconds_bucket{le="1.0",source="cam-1"} 2.0' in text
    assert 'offramp_latency_seconds_bucket{le="+Inf",source="cam-1"} 3.0' in text
    assert 'offramp_latency_seconds_count{source="cam-1"} 3.0' in text
    assert "# TYPE offramp_samples_total counter" in text
    assert 'offramp_samples_total{segment="2"} 41.0' in text
    queued[2] = 0  # readings are taken at each scrape
    assert 'offramp_queue_length{segment="2"} 0.0' in reg.render().decode()


def test_a_reading_with_other_labels_than_before_is_an_error() -> None:
    reg = Metrics()
    reg.on_collect(lambda r: (r.gauge("offramp_x", "x", 1, a=1), r.gauge("offramp_x", "x", 2)))
    with pytest.raises(ValueError, match="offramp_x"):
        reg.render()


async def _get(port: int, request: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    if not data:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_endpoints_answer_and_bad_requests_do_not_hurt() -> None:
    missing: list[str | None] = ["no plan yet"]
    reg = Metrics()
    reg.counter("offramp_x_total", "x").inc()
    server = HealthServer("127.0.0.1", 0, reg, lambda: missing[0])
    await server.start()
    try:
        assert await _get(server.port, b"GET /livez HTTP/1.1\r\n\r\n") == (200, "ok\n")
        assert await _get(server.port, b"GET /readyz HTTP/1.1\r\n\r\n") == \
            (503, "not ready: no plan yet\n")
        missing[0] = None
        assert (await _get(server.port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
        status, body = await _get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and "offramp_x_total 1.0" in body
        assert (await _get(server.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _get(server.port, b"POST /livez HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _get(server.port, b"garbage\r\n\r\n"))[0] == 400
        assert await _get(server.port, b"GET /" + b"a" * 10_000) == (0, "")  # over the limit
        assert (await _get(server.port, b"GET /livez HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        await server.close()


def test_a_running_service_is_live_ready_and_exports_metrics(
        tiny_bundle: Bundle, bus_settings: BusSettings, tmp_path: Path) -> None:
    port = _free_port()
    group = ProcessGroup(tmp_path, {"OFFRAMP_BROKER_URL": bus_settings.broker_url,
                                    "OFFRAMP_TOPIC_PREFIX": bus_settings.topic_prefix,
                                    "OFFRAMP_HTTP_PORT": str(port),
                                    "OFFRAMP_ARBITER_BUNDLE": str(tiny_bundle.root)})
    group.add("exit-arbiter", "arbiter-h")
    try:
        body = _wait_http(port, "/readyz", 30)
        assert body == "ready\n"
        assert _wait_http(port, "/livez", 5) == "ok\n"
        metrics = _wait_http(port, "/metrics", 5)
        assert "offramp_bus_connected 1" in metrics
        assert 'offramp_exit_threshold{exit="1"}' in metrics
        # the container healthcheck command, as docker-compose.yml runs it
        answer = subprocess.run([sys.executable, "-m", "offramp.node.health"], check=False,
                                capture_output=True, text=True,
                                env={**os.environ, "OFFRAMP_HTTP_PORT": str(port)})
        assert answer.returncode == 0 and answer.stdout == "ready\n", answer
    finally:
        codes = group.stop()
    assert codes == {"arbiter-h": 0}


def test_the_probe_fails_with_a_reason_when_nothing_answers() -> None:
    port = _free_port()
    healthy, said = probe(port=port)
    assert not healthy and f"no answer on port {port}" in said
    assert probe(port=0) == (False, "OFFRAMP_HTTP_PORT is not set: the service has no HTTP "
                                    "server to ask")


def _free_port() -> int:
    from offramp.local.broker import free_port

    return free_port()


def _wait_http(port: int, path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                body: str = r.read().decode()
                return body
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    pytest.fail(f"{path} did not answer 200 within {timeout} s: {last}")
