"""The whole system as separate processes on a real broker, with a real bundle.

The oracle: for the same frames and thresholds, the distributed answer (label, exit,
confidence) of every frame equals an in-process run of the chained segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest

from exit_arbiter.service import ArbiterSettings, make_policy
from offramp.bus import Bus, Topics, from_payload
from offramp.local.client import answered, collect, envelope, publish_frames, wait_for_workers
from offramp.local.system import LocalSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle
from offramp.model.inputs import normalise
from offramp.model.sessions import SegmentRunner
from offramp.policy.exits import decide
from offramp.settings import BusSettings
from offramp.wire import ExitPolicy, Heartbeat, Result

pytestmark = pytest.mark.tier("broker")

FAST = {"OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "1.5", "OFFRAMP_ARBITER_REPUBLISH_S": "0.5",
        "OFFRAMP_RECONNECT_MAX_S": "0.5"}


@dataclass
class Answer:
    label: int
    exit_index: int
    confidence: float
    scores: tuple[float, ...] = ()  # the confidence at each exit it reached


def reference(bundle: Bundle, images: np.ndarray, policy: ExitPolicy,
              device: str = "cpu") -> list[Answer]:
    """The chained segments in this process, one sample at a time, same rule."""
    x = normalise(images, bundle.manifest.input)
    runners = [SegmentRunner(bundle, s.index, device=device) for s in bundle.manifest.segments]
    answers = []
    for i in range(len(x)):
        h = x[i:i + 1]
        scores: list[float] = []
        for k, runner in enumerate(runners, start=1):
            out = runner.run(h)
            last = k == len(runners)
            d = decide(policy.criterion, None if last else policy.thresholds[k - 1], out.logits,
                       last=last)
            scores.append(float(d.confidence[0]))
            if d.exits[0]:
                answers.append(Answer(int(d.labels[0]), k, scores[-1], tuple(scores)))
                break
            assert out.activation is not None
            h = out.activation
    return answers


async def _run(system: LocalSystem, payloads: list[bytes], *, rate: float = 200,
               during: object = None, timeout: float = 60) -> list[Result]:
    topics = Topics(system.prefix)
    settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix, session_expiry_s=60,
                           reconnect_max_s=0.5, publish_timeout_s=30)
    async with Bus(settings, f"test-client-{os.getpid()}") as bus:
        await bus.wait_connected(10)
        await wait_for_workers(bus, topics, system.workers, 60)
        policy = await bus.subscribe(topics.exit_policy(system.bundle.name))
        await asyncio.wait_for(policy.get(), 30)
        results = await bus.subscribe(topics.results_all(), qos=1, maxsize=100_000)
        sender = asyncio.create_task(publish_frames(bus, topics.ingest("cam-1"), payloads, rate))
        if during is not None:
            await during(bus)  # type: ignore[operator]
        await sender
        got = await collect(results, len(payloads), timeout)
        # Everything else that comes within 1.5 s: a duplicate result, or the results still
        # owed when QoS 1 redelivered some across a broker restart (each counted above, so
        # reading only one more here lost frames that had been answered).
        late = await collect(results, len(payloads), 1.5)
    return got.results + late.results


def _frames(n: int, offset: int = 0) -> tuple[np.ndarray, list[bytes]]:
    test = load_digits().test
    images = test.images[offset:offset + n]
    return images, [envelope(f"f{i}", image=im) for i, im in enumerate(images)]


@pytest.mark.parametrize(("workers", "resident"), [(1, "off"), (2, "off"), (3, "off"), (2, "on")])
def test_distributed_answers_equal_the_in_process_chain(tiny_bundle: Bundle, workers: int,
                                                        resident: str, prefix: str) -> None:
    """resident=on: activations kept in ONNX Runtime's buffers between the segments a worker
    hosts, and brought to the host for packets to the other (the GPU path, on the CPU)."""
    images, payloads = _frames(60)
    policy = make_policy(ArbiterSettings(), tiny_bundle.calibration(), tiny_bundle.name, 1)
    want = reference(tiny_bundle, images, policy)
    assert len({a.exit_index for a in want}) > 1, "thresholds should make some samples exit early"
    env = {**FAST, "OFFRAMP_WORKER_RESIDENT": resident}
    with LocalSystem(tiny_bundle, workers, prefix=prefix, env=env) as system:
        results = asyncio.run(_run(system, payloads))
        codes = system.stop()
    assert len(results) == len(payloads)
    assert_like_reference(results, want, codes)


def assert_like_reference(results: list[Result], want: list[Answer],
                          codes: dict[str, int | None]) -> None:
    """One answer per frame f0, f1, ..., each as the in-process chain gave it, and every
    service stopped cleanly."""
    by_frame = {r.frame_id: r for r in results}
    assert len(by_frame) == len(want)
    for i, expected in enumerate(want):
        r = by_frame[f"f{i}"]
        assert r.status == "ok", r
        assert (r.label, r.exit_index) == (expected.label, expected.exit_index), (i, r, expected)
        assert r.confidence == pytest.approx(expected.confidence, abs=1e-4)
    assert all(code == 0 for code in codes.values()), str(codes)


@pytest.mark.gpu
def test_cuda_workers_answer_like_the_in_process_cuda_chain(tiny_bundle: Bundle,
                                                           prefix: str) -> None:
    """The oracle on the GPU. cuDNN chooses kernels by batch size, and ONNX Runtime's CUDA
    convolutions use TF32, so answers agree to 5e-3, and a frame whose confidence is that close
    to a threshold may leave at the neighbouring exit."""
    images, payloads = _frames(60)
    policy = make_policy(ArbiterSettings(), tiny_bundle.calibration(), tiny_bundle.name, 1)
    assert policy.criterion == "confidence"
    want = reference(tiny_bundle, images, policy, device="cuda")
    with LocalSystem(tiny_bundle, 2, prefix=prefix,
                     env={**FAST, "OFFRAMP_WORKER_DEVICE": "cuda"}) as system:
        results = asyncio.run(_run(system, payloads))
        logs = system.logs(tail=100_000)
        codes = system.stop()
    assert "device_unavailable" not in logs and "CUDAExecutionProvider" in logs, logs
    by_frame = {r.frame_id: r for r in results}
    assert len(results) == len(payloads) == len(by_frame)
    for i, expected in enumerate(want):
        r = by_frame[f"f{i}"]
        assert r.status == "ok" and r.exit_index is not None, r
        if r.exit_index != expected.exit_index:
            k = min(r.exit_index, expected.exit_index)
            assert abs(expected.scores[k - 1] - policy.thresholds[k - 1]) < 5e-3, (i, r, expected)
            continue
        assert r.label == expected.label, (i, r, expected)
        assert r.confidence == pytest.approx(expected.confidence, abs=5e-3)
    assert all(code == 0 for code in codes.values()), str(codes)


def test_malformed_frames_get_error_results_and_nothing_stops(tiny_bundle: Bundle,
                                                              prefix: str) -> None:
    _, good = _frames(30)
    bad = [b"", b"hello", b"\xff\xd8\xff-not-a-jpeg", b"\x93NUMPY\x01\x00garbage",
           envelope("wrong-shape", tensor=np.zeros((3, 8, 8), np.float32)),
           envelope("nan", tensor=np.full((3, 32, 32), np.nan, np.float32)), b"\x81\xa1v\x07",
           msgpack.packb({"v": 1, "k": "frame", "frame": "broken-envelope", "ts": "noon"})]
    payloads = good[:15] + bad + good[15:]

    async def garbage_on_worker_topics(bus: Bus) -> None:
        topics = Topics(prefix)
        for topic in (topics.act(tiny_bundle.name, 1, "worker-1"), topics.act(tiny_bundle.name, 2),
                      topics.done("cam-1"), topics.exit_policy(tiny_bundle.name)):
            await bus.publish(topic, b"\x00garbage", qos=1)

    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=FAST) as system:
        results = asyncio.run(_run(system, payloads, during=garbage_on_worker_topics))
        codes = system.stop()
    status = Counter(r.status for r in results)
    assert len(results) == len(payloads)
    assert status == {"ok": len(good), "error": len(bad)}
    errors = [r.error or "" for r in results if r.status == "error"]
    assert any("does not match the model input" in e for e in errors)
    assert any("NaN" in e for e in errors)
    assert any("unrecognised frame" in e for e in errors)
    broken = next(r for r in results if r.frame_id == "broken-envelope")  # its own id
    assert broken.status == "error" and "does not follow docs/wire.md" in (broken.error or "")
    assert all(code == 0 for code in codes.values()), str(codes)


def test_killed_worker_is_replaced_and_every_frame_still_answered_once(
        tiny_bundle: Bundle, prefix: str) -> None:
    _, payloads = _frames(200)
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=FAST) as system:
        victim = system.member("worker-2")
        segments = system.assignment[1]

        async def kill_and_replace(bus: Bus) -> None:
            await asyncio.sleep(0.6)
            victim.signal(signal.SIGKILL)
            await asyncio.sleep(0.3)
            system.add_worker("worker-3", segments)

        results = asyncio.run(_run(system, payloads, rate=150, during=kill_and_replace))
        system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert len(results) == len(payloads) and set(per_frame.values()) == {1}
    assert Counter(r.status for r in results) == {"ok": len(payloads)}, Counter(
        r.error for r in results)


def test_broker_restart_mid_stream_loses_no_frame(tiny_bundle: Bundle, prefix: str) -> None:
    _, payloads = _frames(200)
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=FAST) as system:
        assert system.broker is not None

        async def restart(bus: Bus) -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(system.broker.restart)  # type: ignore[union-attr]

        results = asyncio.run(_run(system, payloads, rate=150, during=restart, timeout=90))
        logs = system.logs()
        codes = system.stop()
    # QoS 1 is at least once: across the restart the broker may hand the test client a
    # result it had already delivered (same task id, same result). offramp must not have
    # made two different results for one frame.
    distinct = {r.task_id: r for r in results}.values()
    per_frame = Counter(r.frame_id for r in distinct)
    assert len(per_frame) == len(payloads), logs[-3000:]
    assert set(per_frame.values()) == {1}
    assert Counter(r.status for r in distinct)["ok"] == len(payloads)
    assert all(code == 0 for code in codes.values()), str(codes)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_offramp_up_serves_and_stops_every_service_cleanly(tiny_bundle: Bundle, tmp_path: Path,
                                                           stop: str) -> None:
    """Ctrl-C reaches the whole foreground process group; services run in their own session,
    so only `offramp up` sees it and stops each of them once (all exit 0). It does so also when
    started with SIGINT ignored (as a script's background job is), and on a SIGTERM to it
    alone (a service manager's stop), which used to leave the services running."""
    import json
    import subprocess
    import sys

    from offramp.local.broker import free_port

    port, http = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("w") as sink:  # a file, not a pipe: the live view writes all the time
        up = [sys.executable, "-m", "offramp.cli", "up", "--bundle", str(tiny_bundle.root),
              "--port", str(port), "--logs", str(tmp_path / "logs")]
        if stop == "ctrl-c":  # started with SIGINT ignored, as a script's background job is
            up = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *up]
        # OFFRAMP_HTTP_PORT in up's environment is where the services' ports start, one each
        # (passed on as it was, every service but the first failed to listen)
        proc = subprocess.Popen(up, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "COLUMNS": "120",
                                                             "OFFRAMP_HTTP_PORT": str(http)})
    try:
        system = LocalSystem(tiny_bundle, 2, broker_url=f"mqtt://127.0.0.1:{port}")
        _, payloads = _frames(20)
        time.sleep(3)
        results = asyncio.run(_run(system, payloads, rate=100))
        assert Counter(r.status for r in results) == {"ok": 20}
        header = log.read_text()
        assert f"logs:    {tmp_path / 'logs'}" in header and "health and metrics" in header
        from offramp.node.health import probe

        for node in ("arbiter-1", "scheduler-1", "worker-1", "worker-2", "admission-1"):
            listed = int(header.split(f"{node} :")[1].split(",")[0].split(" ")[0])
            assert probe("/readyz", listed)[0], node
    finally:
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    stopped = json.loads(out[out.index('{"stopped"'):].splitlines()[0])["stopped"]
    assert len(stopped) == 5 and set(stopped.values()) == {0}, out[-2000:]
    assert proc.returncode == 0
    assert len(list((tmp_path / "logs").glob("*.log"))) == 5  # kept after the stop


def test_task_ids_are_never_reused_by_a_restarted_admission_controller(
        tiny_bundle: Bundle, prefix: str) -> None:
    """A successor counts its task ids afresh, so each id names its incarnation: a client that
    deduplicates by task id (as the README advises) must never see one id on two frames."""
    images, _ = _frames(40)
    first = [envelope(f"a{i}", image=im) for i, im in enumerate(images[:20])]
    second = [envelope(f"b{i}", image=im) for i, im in enumerate(images[20:])]
    with LocalSystem(tiny_bundle, 1, prefix=prefix, env=FAST) as system:
        before = asyncio.run(_run(system, first))
        admission = system.member("admission-1")
        assert admission.stop() == 0
        admission.start()
        after = asyncio.run(_run(system, second))
        codes = system.stop()
    results = before + after
    assert Counter(r.status for r in results) == {"ok": 40}
    assert len({r.task_id for r in results}) == 40
    incarnations = {r.task_id.rsplit("-", 2)[1] for r in results}
    assert len(incarnations) == 2, incarnations
    assert all(r.task_id.startswith("admission-1-") for r in results)
    assert all(code == 0 for code in codes.values()), str(codes)


LATER_HOPS_ENV = {"OFFRAMP_WORKER_FOLLOW_PLAN": "false", "OFFRAMP_ARBITER_REPUBLISH_S": "0.5"}


def later_hop_workers(system: LocalSystem) -> None:
    """worker-2 runs segment 1 and passes the rest on to worker-1 or, 3x slower, worker-3
    (with LATER_HOPS_ENV: no plan moves them): worker-1 is never a frame's first hop."""
    rest = tuple(range(2, system.bundle.num_segments + 1))
    system.add_worker("worker-1", rest)
    system.add_worker("worker-2", (1,))
    system.add_worker("worker-3", rest, {"OFFRAMP_WORKER_SLOWDOWN": "3"})
    system.workers = 3


def _drained_in_time(system: LocalSystem, victim: str, results: list[Result], sent: int) -> str:
    """After a worker's SIGTERM mid-stream: it exited 0, and every frame was answered once,
    ``ok``, none slower than 1 s. Stops the system; returns its logs."""
    member = system.member(victim)
    assert member.proc is not None
    code = member.proc.wait(20)
    logs = system.logs(tail=3000)
    system.stop()
    per_frame = Counter(r.frame_id for r in results)
    assert len(per_frame) == sent and set(per_frame.values()) == {1}
    assert Counter(r.status for r in results) == {"ok": sent}
    slowest = max(r.latency_ms["total"] for r in results)
    assert slowest < 1000, (slowest, victim, logs)
    assert code == 0
    return logs


@pytest.mark.exclusive
def test_a_worker_stopped_mid_stream_says_so_first_and_no_frame_waits(
        tiny_bundle: Bundle, prefix: str) -> None:
    """The rolling-update case. worker-2 runs segment 1 and sends the rest on to worker-1 (or,
    slower, to worker-3, which hosts the same). worker-1 gets SIGTERM mid-stream: it says it is
    draining before it stops reading, so worker-2 stops sending to it at once, and packets
    already on their way are still served. Every frame is answered, none slower than 1 s: a
    packet lost on that later hop would wait for the admission-controller's 5 s progress
    timeout, since worker-1 was not the frame's first hop. The signal goes once worker-1 has
    served a frame (which of the two worker-2 picks first is up to its estimates), with
    frames still flowing."""
    _, payloads = _frames(540)
    with LocalSystem(tiny_bundle, 0, prefix=prefix, env=LATER_HOPS_ENV) as system:
        later_hop_workers(system)
        victim = system.member("worker-1")

        async def rolling_update(bus: Bus) -> None:
            async with Bus(BusSettings(broker_url=system.url), "victim-watcher") as watcher:
                answers = await watcher.subscribe(Topics(system.prefix).results_all(),
                                                  decode=from_payload(Result.from_json))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        while "worker-1" not in (await answers.get()).nodes:
                            pass
            victim.signal(signal.SIGTERM)

        results = asyncio.run(_run(system, payloads, rate=180, during=rolling_update))
        logs = _drained_in_time(system, victim.node, results, len(payloads))
    assert '"worker_draining"' in logs
    assert any("worker-1" in r.nodes for r in results)  # it did serve until it stopped


@pytest.mark.exclusive
def test_a_rolling_update_under_the_plan_keeps_every_frame_under_a_second(
        tiny_bundle: Bundle, prefix: str) -> None:
    """#28.4 as `offramp up` runs it: two workers following the plan (each hosts the whole
    model), frames flowing, and the worker that served the most first hops so far gets
    SIGTERM. It stops taking new work at once, the admission-controller sends the rest to
    the other, and what it held is served before it exits: every frame once, none over 1 s."""
    _, payloads = _frames(360)
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=FAST) as system:
        signalled: list[str] = []

        async def rolling_update(bus: Bus) -> None:
            done: dict[str, float] = {}
            async with Bus(BusSettings(broker_url=system.url), "victim-picker") as watcher:
                states = await watcher.subscribe(Topics(system.prefix).state_all("worker"),
                                                 decode=from_payload(Heartbeat.decode))
                deadline = time.monotonic() + 1.2
                while time.monotonic() < deadline:  # who has answered the most, so far
                    with contextlib.suppress(TimeoutError):
                        hb = await asyncio.wait_for(states.get(), deadline - time.monotonic())
                        done[hb.node] = hb.stats.get("completions", 0.0)
            busiest = max(sorted(done), key=lambda n: done[n]) if done else "worker-1"
            system.member(busiest).signal(signal.SIGTERM)
            signalled.append(busiest)

        results = asyncio.run(_run(system, payloads, rate=180, during=rolling_update))
        _drained_in_time(system, signalled[0], results, len(payloads))


def test_a_broker_crash_loses_no_frame_a_camera_sends_again(tiny_bundle: Bundle,
                                                            prefix: str) -> None:
    """#28.5: the broker is SIGKILLed mid-stream (what it held in memory is gone: frames
    acknowledged to the camera and not yet delivered, answers not yet delivered) and started
    again. The camera sends again, under the same id, each frame with no answer after 3 s.
    Every frame ends with an answer, and no frame with two different ones: a frame answered
    before the crash is told the same answer again (same task id), one that never arrived is
    served now."""
    _, payloads = _frames(300)
    frames = {f"f{i}": p for i, p in enumerate(payloads)}
    # Activation packets (QoS 0) sent to a worker while it reconnects are lost, and each
    # such dispatch counts against the frame's attempts; at this test's 1.5 s progress
    # timeout the default 3 were once all spent within the outage (one frame answered
    # 'error: no result after 3 dispatches', a local run of the suite). What is tested here is
    # that nothing is lost or told twice, so the frame gets attempts to outlast the restart.
    crash_env = {**FAST, "OFFRAMP_ADMISSION_MAX_ATTEMPTS": "6"}
    with LocalSystem(tiny_bundle, 2, prefix=prefix, env=crash_env) as system:
        assert system.broker is not None
        topics = Topics(system.prefix)

        async def run() -> list[Result]:
            settings = BusSettings(broker_url=system.url, topic_prefix=system.prefix,
                                   session_expiry_s=60, reconnect_max_s=0.5,
                                   publish_timeout_s=30)
            async with Bus(settings, f"test-camera-{os.getpid()}") as bus:
                await bus.wait_connected(10)
                await wait_for_workers(bus, topics, system.workers, 60)
                results = await bus.subscribe(topics.results_all(), qos=1, maxsize=100_000)

                async def crash() -> None:
                    await asyncio.sleep(0.8)
                    await asyncio.to_thread(system.broker.kill)  # type: ignore[union-attr]
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(system.broker.start)  # type: ignore[union-attr]

                crashing = asyncio.create_task(crash())
                await publish_frames(bus, topics.ingest("cam-1"), payloads, 150)
                await crashing
                got = await answered(bus, topics.ingest("cam-1"), frames, results, wait_s=3.0,
                                     again=5)
                return got.results

        results = asyncio.run(run())
        logs = system.logs()
        codes = system.stop()
    told: dict[str, set[str]] = {}
    for r in results:
        told.setdefault(r.frame_id, set()).add(r.task_id)
    assert set(told) == set(frames), (len(told), logs[-3000:])
    assert all(len(ids) == 1 for ids in told.values()), {f: i for f, i in told.items()
                                                          if len(i) > 1}
    assert {r.status for r in results} == {"ok"}, Counter(r.error for r in results)
    assert all(code == 0 for code in codes.values()), str(codes)
