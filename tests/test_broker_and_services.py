"""The local broker and the service entry points, run as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offramp.bus import Bus, Topics, from_payload
from offramp.errors import BrokerError
from offramp.local.broker import LocalBroker, find_mosquitto
from offramp.local.launcher import ServiceProcess
from offramp.local.services import service_modules
from offramp.model.bundle import Bundle
from offramp.model.sessions import SegmentRunner
from offramp.node.runtime import Runtime
from offramp.settings import BusSettings, CommonSettings
from offramp.wire import Heartbeat

pytestmark = pytest.mark.tier("broker")


def test_missing_mosquitto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda *a, **k: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        find_mosquitto()


def test_broker_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    broker = LocalBroker(extra_config="this_is_not_an_option 1", workdir=tmp_path)
    with pytest.raises(BrokerError, match="exited with code"):
        broker.start()


def test_private_broker_stops_and_restarts_on_the_same_port() -> None:
    with LocalBroker() as broker:
        port = broker.port
        broker.restart()
        assert broker.running and broker.port == port
    assert not broker.running


@pytest.fixture
def bundle_env(tiny_bundle: Bundle) -> dict[str, str]:
    """Every service that needs a model bundle gets the one built in this test session."""
    root = str(tiny_bundle.root)
    return {"OFFRAMP_ADMISSION_BUNDLE": root, "OFFRAMP_WORKER_BUNDLE": root,
            "OFFRAMP_ARBITER_BUNDLE": root, "OFFRAMP_SCHEDULER_BUNDLE": root}


async def test_heartbeats_sent_early_on_request_keep_their_gap_and_schedule(
        bus_settings: BusSettings, topics: Topics) -> None:
    """beat_soon() sends a heartbeat well before the period, at most one per gap however often
    it is asked for, and the periodic ones still come."""
    common = CommonSettings(node="early", heartbeat_s=1.5, heartbeat_gap_ms=100, bus=bus_settings)
    async with Bus(bus_settings, "observer") as bus:
        sub = await bus.subscribe(topics.state("worker", "early"))
        await bus.wait_connected(5)
        async with Runtime("worker", common) as runtime:
            first = Heartbeat.decode((await asyncio.wait_for(sub.get(), 10)).payload)
            start = time.monotonic()
            beats = []
            while time.monotonic() - start < 1.0:  # asked for every 5 ms for a second
                runtime.beat_soon()
                await asyncio.sleep(0.005)
                beats += sub.inbox.drain()
            early = len(beats)
            await asyncio.sleep(1.0)  # not asked any more: only the periodic one, at 1.5 s
            later = sub.inbox.drain()
    assert first.online
    assert 5 <= early <= 11, early  # about one per 100 ms gap, never more
    assert runtime.early_beats >= early - 1
    assert 1 <= len(later) <= 2, len(later)  # the schedule goes on


@pytest.mark.parametrize("service", sorted(service_modules()))
async def test_service_heartbeats_then_stops_cleanly_on_sigterm(
        service: str, broker: LocalBroker, bus_settings: BusSettings, topics: Topics,
        prefix: str, tmp_path: Path, bundle_env: dict[str, str]) -> None:
    proc = ServiceProcess(service, f"{service}-t", {
        "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix,
        "OFFRAMP_LOG_FORMAT": "json", **bundle_env}, tmp_path / "svc.log")
    beats: list[Heartbeat] = []
    async with Bus(bus_settings, "observer") as bus:
        sub = await bus.subscribe(topics.state_all())
        await bus.wait_connected(5)
        proc.start()
        try:
            first = None
            while first is None or time.monotonic() - first < 1.0:
                hb = Heartbeat.decode((await asyncio.wait_for(sub.get(), 20)).payload)
                first = first or time.monotonic()
                beats.append(hb)
            code = await asyncio.to_thread(proc.stop, 10)
            last = Heartbeat.decode((await asyncio.wait_for(sub.get(), 5)).payload)
            while last.online:
                last = Heartbeat.decode((await asyncio.wait_for(sub.get(), 5)).payload)
        finally:
            proc.kill()
    assert code == 0, (tmp_path / "svc.log").read_text()
    assert len(beats) >= 4, "at least 4 heartbeats a second"
    assert all(hb.online and hb.node == f"{service}-t" for hb in beats)
    assert [hb.seq for hb in beats] == sorted(hb.seq for hb in beats)
    assert not last.online


async def test_worker_says_which_device_it_really_runs_on(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics, prefix: str,
        tmp_path: Path, bundle_env: dict[str, str], tiny_bundle: Bundle) -> None:
    """Asked for cuda, a worker runs where ONNX Runtime can (CPU without onnxruntime-gpu or a
    GPU), says so in its heartbeat and warns once, rather than being slow without a word."""
    expected = SegmentRunner(tiny_bundle, 1, device="cuda").device
    log = tmp_path / "worker.log"
    proc = ServiceProcess("segment-worker", "w-cuda", {
        "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix,
        "OFFRAMP_LOG_FORMAT": "json", "OFFRAMP_WORKER_DEVICE": "cuda", **bundle_env}, log)
    async with Bus(bus_settings, "observer") as bus:
        sub = await bus.subscribe(topics.state_all())
        await bus.wait_connected(5)
        proc.start()
        try:
            hb = Heartbeat.decode((await asyncio.wait_for(sub.get(), 20)).payload)
            while not hb.device:
                hb = Heartbeat.decode((await asyncio.wait_for(sub.get(), 20)).payload)
            code = await asyncio.to_thread(proc.stop, 10)
        finally:
            proc.kill()
    assert code == 0, log.read_text()
    assert hb.device == expected
    warnings = [line for line in log.read_text().splitlines() if "device_unavailable" in line]
    assert len(warnings) == (0 if expected == "cuda" else 1), log.read_text()
    if warnings:
        assert '"asked": "cuda"' in warnings[0] and '"using": "cpu"' in warnings[0]


@pytest.mark.parametrize(("env", "words"), [
    ({"OFFRAMP_HEARTBEAT_S": "fast"}, "OFFRAMP_HEARTBEAT_S='fast': expected a number"),
    ({"OFFRAMP_NODE": "bad/name"}, "OFFRAMP_NODE 'bad/name' is not a valid topic level"),
    ({"OFFRAMP_BROKER_URL": ""}, "OFFRAMP_BROKER_URL is not set"),
    ({"OFFRAMP_WORKER_BUNDLE": "/nonexistent"}, "model bundle directory /nonexistent does not exist"),
    ({"OFFRAMP_WORKER_SEGMENTS": "1,9"}, "OFFRAMP_WORKER_SEGMENTS: segment 9 is not in 1..4"),
    ({"OFFRAMP_WORKER_DEVICE": "tpu"}, "OFFRAMP_WORKER_DEVICE='tpu': expected one of cpu, cuda"),
    ({"OFFRAMP_LIFELINE_FD": "99"}, "OFFRAMP_LIFELINE_FD=99: not an open file descriptor"),
])
def test_bad_settings_stop_a_service_with_one_clear_line(env: dict[str, str], words: str,
                                                         broker: LocalBroker,
                                                         bundle_env: dict[str, str]) -> None:
    full = {**os.environ, "OFFRAMP_BROKER_URL": broker.url, **bundle_env, **env}
    out = subprocess.run([sys.executable, "-m", service_modules()["segment-worker"]], env=full, check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert words in out.stderr


def test_sigint_also_stops_a_service(broker: LocalBroker, tmp_path: Path,
                                     bundle_env: dict[str, str]) -> None:
    proc = ServiceProcess("exit-arbiter", "arb-int", {"OFFRAMP_BROKER_URL": broker.url,
                                                      **bundle_env}, tmp_path / "a.log")
    proc.start()
    time.sleep(1.5)
    proc.signal(signal.SIGINT)
    assert proc.proc is not None and proc.proc.wait(10) == 0


BROKER_PARENT = """
import time
from offramp.local.broker import LocalBroker
broker = LocalBroker()
broker.start()
print(broker.port, broker._proc.pid if broker._proc else -1, flush=True)
time.sleep(600)
"""


def test_private_broker_goes_with_the_process_that_started_it() -> None:
    """Left behind, it would take frames on its port that nobody answers."""
    parent = subprocess.Popen([sys.executable, "-c", BROKER_PARENT], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    port, pid = map(int, parent.stdout.readline().split())
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        parent.kill()
        parent.wait()
        for _ in range(50):
            if _exited(pid):
                break
            time.sleep(0.1)
        assert _exited(pid), "the broker ran on after its parent died"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        parent.kill()
        parent.wait()
        if pid > 0 and not _exited(pid):
            os.kill(pid, signal.SIGKILL)


PARENT = """
import sys, threading, time
from pathlib import Path
from offramp.local.launcher import ServiceProcess
proc = ServiceProcess("exit-arbiter", "arb-orphan", dict(a.split("=", 1) for a in sys.argv[2:]),
                      Path(sys.argv[1]))
starter = threading.Thread(target=proc.start)  # the thread that forks ends: no matter
starter.start()
starter.join()
print(proc.proc.pid if proc.proc else -1, flush=True)
time.sleep(600)
"""


async def test_service_stops_cleanly_when_the_process_that_started_it_is_killed(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics, prefix: str,
        tmp_path: Path, bundle_env: dict[str, str]) -> None:
    log = tmp_path / "arb.log"
    env = {"OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix,
           "OFFRAMP_LOG_FORMAT": "json", **bundle_env}
    async with Bus(bus_settings, "observer") as bus:
        sub = await bus.subscribe(topics.state("arbiter", "arb-orphan"))
        await bus.wait_connected(5)
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PARENT, str(log), *(f"{k}={v}" for k, v in env.items()),
            stdout=subprocess.PIPE)
        assert parent.stdout is not None
        child = int(await asyncio.wait_for(parent.stdout.readline(), 20))
        try:
            hb = Heartbeat.decode((await asyncio.wait_for(sub.get(), 20)).payload)
            assert hb.online
            parent.kill()  # no chance to stop its child
            await parent.wait()
            deadline = time.monotonic() + 10
            while hb.online and time.monotonic() < deadline:  # it says it goes, as on SIGTERM
                hb = Heartbeat.decode((await asyncio.wait_for(sub.get(), 10)).payload)
            assert not hb.online, "the service ran on after its parent died"
            for _ in range(50):
                if _exited(child):
                    break
                await asyncio.sleep(0.1)
            assert _exited(child), "the service said it stopped but did not exit"
        finally:
            if parent.returncode is None:
                parent.kill()
                await parent.wait()
            if child > 0 and not _exited(child):
                os.kill(child, signal.SIGKILL)  # leave no orphan behind a failed test
    lines = log.read_text()
    assert '"parent_gone"' in lines and '"service_stopped"' in lines, lines


def _exited(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_frames_taken_but_not_yet_decoded_are_answered_when_admission_stops(
        broker: LocalBroker, bus_settings: BusSettings, topics: Topics, prefix: str,
        tmp_path: Path, bundle_env: dict[str, str]) -> None:
    """From the moment the admission-controller reads a frame it owes it a result (it
    acknowledges the frame to the broker once answered). Images of 16 megapixels (50 KB of PNG
    each, a few tenths of a second to decode) keep its decode thread busy while the rest wait
    in its inbox and in hand; with no standby to leave them to, a SIGTERM answers every one,
    and the process exits at once (none was sent to a worker, so there is nothing to wait
    for)."""
    import numpy as np

    from offramp.local.client import envelope
    from offramp.wire import Result

    image = np.zeros((4000, 4000, 3), np.uint8)
    image[::7] = 200
    n = 40
    payloads = [envelope(f"big-{i}", image=image) for i in range(n)]
    proc = ServiceProcess("admission-controller", "adm-stop", {
        "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix,
        "OFFRAMP_LOG_FORMAT": "json", "OFFRAMP_MAX_PIXELS": str(4000 * 4000),
        **bundle_env}, tmp_path / "adm.log")
    async with Bus(bus_settings, "camera") as bus:
        await bus.wait_connected(5)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=1000)
        admission = await bus.subscribe(topics.state_all("admission"),
                                        decode=from_payload(Heartbeat.decode))
        proc.start()
        try:
            async with asyncio.timeout(20):  # up, and holding the ingest session
                while not (await admission.get()).active_since:
                    pass
            for p in payloads:
                await bus.publish(topics.ingest("cam-1"), p, qos=1)
            await asyncio.sleep(1.5)  # all delivered; a few decoded at most
            started = time.monotonic()
            code = await asyncio.to_thread(proc.stop, 10)
            took = time.monotonic() - started
            got = [Result.from_json((await asyncio.wait_for(results.get(), 10)).payload)
                   for _ in range(n)]
            await asyncio.sleep(0.3)
            extra = len(results.inbox)
        finally:
            proc.kill()
    log = (tmp_path / "adm.log").read_text()
    assert code == 0, log
    assert took < 5, f"stopping took {took:.1f} s"
    assert extra == 0
    assert all(r.status == "error" and "stopped" in (r.error or "") for r in got), got
    assert len({r.task_id for r in got}) == n
