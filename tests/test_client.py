"""offramp's Python client on a running system (real broker, real services, the tiny bundle):
the examples of docs/client.md run as they are written; each frame's one answer matched by
its response topic; bad frames one clear error; the pace followed."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from offramp.client import BlockingClient, Client, encode_frame
from offramp.errors import OfframpError
from offramp.local.broker import LocalBroker
from offramp.local.client import png_bytes
from offramp.local.system import LocalSystem
from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle

pytestmark = pytest.mark.tier("broker")

TOP = Path(__file__).parent.parent
DOC = TOP / "docs" / "client.md"
README_BROKER = 'broker="mqtt://127.0.0.1:1883"'


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _readme_example() -> str:
    """The README's example of the client, pointed at the test's broker and prefix."""
    found = [code for code in re.findall(r"```python\n(.*?)```", (TOP / "README.md").read_text(),
                                         flags=re.S) if "offramp.client" in code]
    assert len(found) == 1 and README_BROKER in found[0]
    return found[0].replace(README_BROKER, "broker=os.environ['OFFRAMP_BROKER_URL'], "
                            "prefix=os.environ['OFFRAMP_TOPIC_PREFIX']")


def _readme_paho_example(url: str, prefix: str) -> str:
    """The README's paho-mqtt example, on the test's broker and prefix; its endless
    ``loop_forever`` runs for 10 s instead."""
    found = [code for code in re.findall(r"```python\n(.*?)```", (TOP / "README.md").read_text(),
                                         flags=re.S) if "paho.mqtt" in code]
    assert len(found) == 1
    host, port = url.removeprefix("mqtt://").split(":")
    code = found[0]
    for written, here in (('"127.0.0.1", 1883', f'"{host}", {port}'),
                          ('"offramp/v1/', f'"{prefix}/'),
                          ("client.loop_forever()", "import time\nclient.loop_start()\n"
                           "time.sleep(10)\nclient.loop_stop()")):
        assert written in code, written
        code = code.replace(written, here)
    return code


def test_the_documented_examples_run_against_a_running_system(
        tiny_bundle: Bundle, prefix: str, broker: LocalBroker, tmp_path: Path,
        up: Callable[[LocalSystem], LocalSystem]) -> None:
    examples = _examples()
    assert len(examples) == 2
    (tmp_path / "digit.png").write_bytes(png_bytes(load_digits().test.images[0]))
    env = {**os.environ, "OFFRAMP_BROKER_URL": broker.url, "OFFRAMP_TOPIC_PREFIX": prefix}
    with LocalSystem(tiny_bundle, 1, prefix=prefix, broker_url=broker.url) as system:
        up(system)
        outputs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, timeout=120, check=False, cwd=tmp_path)
                   for code in [*examples, "import os\n" + _readme_example(),
                                _readme_paho_example(broker.url, prefix)]]
    blocking, streaming, readme, paho = outputs
    assert readme.returncode == 0, readme.stderr
    assert readme.stdout.split()[0] == "ok", readme.stdout
    assert paho.returncode == 0, paho.stderr
    [answer] = paho.stdout.splitlines()  # one frame sent, one answer: id, status, label, exit
    _, status, label, exit_index = answer.split()
    assert status == "ok" and 0 <= int(label) < 10 and int(exit_index) >= 1, answer
    assert blocking.returncode == 0, blocking.stderr
    lines = blocking.stdout.splitlines()
    assert len(lines) == 5 and all(line.split()[1] == "ok" for line in lines), lines
    assert streaming.returncode == 0, streaming.stderr
    sent, skipped, ok = map(int, re.findall(r"\d+", streaming.stdout))
    assert sent + skipped == 200 and ok == sent, streaming.stdout


def test_each_frame_gets_its_own_answer_and_a_bad_frame_an_error(
        tiny_bundle: Bundle, prefix: str, broker: LocalBroker,
        up: Callable[[LocalSystem], LocalSystem]) -> None:
    images = load_digits().test
    with LocalSystem(tiny_bundle, 1, prefix=prefix, broker_url=broker.url) as system:
        up(system)
        with BlockingClient("cam-c", broker=broker.url, prefix=prefix) as client:
            good = client.submit(images.images[0], frame_id="first",
                                 label=int(images.labels[0]))
            assert good.frame_id == "first" and good.status == "ok" and good.label is not None
            bad = client.submit(b"\x89PNG not really an image")
            assert bad.status == "error" and bad.error
            for i in range(20):  # the answers of frames sent without waiting, each once
                assert client.send(images.images[i], frame_id=f"s-{i}") == f"s-{i}"
            got = sorted(r.frame_id for r in client.results(timeout_s=3))
            assert got == sorted(f"s-{i}" for i in range(20))
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(images.images[0])


@pytest.mark.exclusive
def test_a_client_that_follows_the_pace_skips_frames_instead_of_having_them_dropped(
        tiny_bundle: Bundle, prefix: str, broker: LocalBroker,
        up: Callable[[LocalSystem], LocalSystem]) -> None:
    env = {"OFFRAMP_CONTROL_STRATEGY": "rate", "OFFRAMP_CONTROL_RATE_MAX": "100"}
    images = load_digits().test.images

    async def flood(client: Client, seconds: float) -> tuple[int, dict[str, int]]:
        sent = 0
        start = asyncio.get_running_loop().time()
        i = 0
        while asyncio.get_running_loop().time() - start < seconds:  # a camera at 400 frames/s
            sent += await client.send(images[i % len(images)]) is not None
            i += 1
            await asyncio.sleep(1 / 400)
        statuses: dict[str, int] = {}
        for _ in range(sent):
            result = await client.next_answer(10)
            statuses[result.status] = statuses.get(result.status, 0) + 1
        return sent, statuses

    async def run() -> tuple[int, dict[str, int], int]:
        async with Client("cam-f", broker=broker.url, prefix=prefix) as client:
            await flood(client, 1.5)  # the controller learns the source and tells its pace
            pace = await client.follow_rate()
            await asyncio.sleep(0.3)
            sent, statuses = await flood(client, 2.0)
            return sent, statuses, pace.skipped

    with LocalSystem(tiny_bundle, 1, prefix=prefix, broker_url=broker.url, env=env) as system:
        up(system)
        sent, statuses, skipped = asyncio.run(run())
    assert skipped >= 300 and sent <= 300, (sent, skipped)  # about 95 of 400 a second went
    assert statuses.get("dropped", 0) <= 0.05 * sent, statuses


def test_a_frame_that_is_not_an_image_is_refused_before_it_is_sent() -> None:
    assert encode_frame(b"\xff\xd8\xffjpeg")[0] == b"\xff\xd8\xffjpeg"
    png, tensor = encode_frame(np.zeros((4, 4, 3), np.uint8))
    assert png is not None and png.startswith(b"\x89PNG") and tensor is None
    assert encode_frame(np.zeros((1, 3, 8, 8), np.float64))[1].dtype == np.float32
    with pytest.raises(OfframpError, match="uint8 pixels or a float"):
        encode_frame(np.zeros((4, 4), np.int32))
    with pytest.raises(OfframpError, match="not str"):
        encode_frame("frame.png")
