"""`offramp testbed` against a real engine: podman's Docker-compatible API service, started
here. Run by `make test-deploy` after it built the images (OFFRAMP_TEST_DEPLOY=1); the default
test run leaves this folder out, since it needs root, podman and those images."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from offramp.local import loadgen
from offramp.local.broker import free_port
from offramp.local.loadgen import Stream
from offramp.ml.data import load_digits

ROOT = Path(__file__).resolve().parents[2]
BROKER_IMAGE = os.environ.get("OFFRAMP_TESTBED_BROKER_IMAGE", "localhost/offramp/mosquitto:2")
NAME = "offramp-deploy-testbed"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    url = f"unix://{sock}"
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "compose/podman/containers.conf")}
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", url], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "podman system service did not open its socket"
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def offramp(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "offramp.cli", "testbed", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_testbed_up_serves_frames_with_profile_limits_and_down_removes_it(engine: str) -> None:
    port = free_port()
    common = ["--engine", engine, "--name", NAME]
    up = ["up", *common, "--nodes", "nano,orin-nano", "--network", "host", "--port", str(port),
          "--broker-image", BROKER_IMAGE, "--bundle", str(ROOT / "bundles/demo")]
    try:
        print(offramp(*up).stdout)
        again = offramp(*up, check=False)
        assert again.returncode == 2 and "is already up" in again.stderr

        client = docker.DockerClient(base_url=engine)
        workers = {c.name: c.attrs["HostConfig"] for c in client.containers.list(
            filters={"label": "io.offramp.testbed.role=segment-worker"})}
        assert {n: (h["NanoCpus"], h["Memory"]) for n, h in workers.items()} == {
            f"{NAME}-nano-1": (500_000_000, 4 * 2**30),
            f"{NAME}-orin-nano-1": (1_500_000_000, 8 * 2**30)}
        status = offramp("status", *common).stdout
        assert f"{NAME}-nano-1" in status and "0.5" in status and "running" in status

        test = load_digits().test
        run = asyncio.run(loadgen.drive(f"mqtt://127.0.0.1:{port}", "offramp/v1", 2,
                                        [Stream("cam-1", 20.0, 4.0)], test, settle_s=60))
        per_frame = Counter(r.frame_id for r in run.results)
        assert len(per_frame) == sum(run.offered.values()) and set(per_frame.values()) == {1}
        assert Counter(r.status for r in run.results) == Counter(ok=len(per_frame))
        served_by = Counter(node for r in run.results for node in r.nodes)
        assert set(served_by) <= {"nano-1", "orin-nano-1"}, served_by
    finally:
        down = offramp("down", *common, check=False)
    assert down.returncode == 0 and "removed 6 containers" in down.stdout, down.stderr
    left = docker.DockerClient(base_url=engine).containers.list(
        all=True, filters={"label": f"io.offramp.testbed={NAME}"})
    assert left == []


def test_testbed_errors_are_one_clear_line(engine: str, tmp_path: Path) -> None:
    bad = offramp("up", "--engine", engine, "--nodes", "tx2", check=False)
    assert bad.returncode == 2 and "unknown node profile 'tx2'" in bad.stderr
    nobundle = offramp("up", "--engine", engine, "--bundle", str(tmp_path), check=False)
    assert nobundle.returncode == 2 and "is not a model bundle" in nobundle.stderr
    notag = offramp("up", "--engine", engine, "--tag", "no-such-tag", "--bundle",
                    str(ROOT / "bundles/demo"), check=False)
    assert notag.returncode == 2 and "images not found on the engine" in notag.stderr
    assert "offramp/segment-worker:no-such-tag" in notag.stderr
    noengine = offramp("status", "--engine", f"unix://{tmp_path}/none.sock", check=False)
    assert noengine.returncode == 2 and "no Docker-compatible engine" in noengine.stderr
