"""The ``offramp`` command as a user meets it: help on every option, stdout for what a command
is for and stderr for logs, a reader that goes away, and the live view of ``offramp up``."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time

import pytest
from rich.console import Console
from sharing import port_base

from offramp import __version__
from offramp.bus import Message, Topics
from offramp.cli.args import arguments, subcommands
from offramp.cli.live import LiveView
from offramp.cli.main import build_parser
from offramp.local.broker import LocalBroker
from offramp.ml.commands import COMMANDS
from offramp.wire import Heartbeat, Pace, Refusal, Result, SegmentLoad

pytestmark = pytest.mark.tier("broker")

OFFRAMP = [sys.executable, "-m", "offramp.cli.main"]


def _parsers(parser: argparse.ArgumentParser, path: str = "offramp"):
    yield path, parser
    for name, (sub, _) in subcommands(parser).items():
        yield from _parsers(sub, f"{path} {name}")


def _every_parser():
    """Every command's parser; a training command's options exist only when it runs."""
    yield from _parsers(build_parser())
    for command in COMMANDS:
        yield from ((path, p) for path, p in _parsers(build_parser(command))
                    if path.startswith(f"offramp {command}"))


def test_every_subcommand_and_option_has_help_with_its_default() -> None:
    missing = []
    for path, parser in _every_parser():
        for action in arguments(parser):
            if action.dest == "help" or action.nargs == argparse.PARSER:
                continue  # --help, and the subcommands' action
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        if " " in path and not parser.description:
            missing.append(f"{path}: no description under its usage")
        help_text = parser.format_help()
        for action in arguments(parser):
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "(default:" in help_text, f"{path}: defaults are not shown"
    assert missing == []
    build_help = build_parser("build").parse_args(["build"]).__dict__
    assert build_help["preset"] == "demo"


def test_version_log_level_after_the_command_and_help_without_the_training_stack() -> None:
    proc = subprocess.run([*OFFRAMP, "--version"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"offramp {__version__}"
    args = build_parser("settings").parse_args(["settings", "--log-level", "debug"])
    assert args.log_level == "debug"
    assert build_parser().parse_args(["--log-level", "error", "settings"]).log_level == "error"
    # `offramp --help` lists the training commands without importing torch (seconds)
    probe = ("import sys\nfrom offramp.cli.main import main\ntry:\n    main(['--help'])\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'onnx' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.splitlines()[-1] == "False False", proc.stdout + proc.stderr
    assert all(name in proc.stdout for name in COMMANDS)
    proc = subprocess.run([*OFFRAMP, "settings", "worker"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no service 'worker'; one of" in proc.stderr


def test_wrong_values_get_one_clear_line() -> None:
    proc = subprocess.run([*OFFRAMP, "demo", "--workers", "0"], check=False,
                          capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "expected at least 1, got 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*OFFRAMP, "build", "--preset", "nope"], check=False,
                          capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # `offramp settings | head -1`: the pipe closes after one line
    with subprocess.Popen([*OFFRAMP, "settings"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert code == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_watch_prints_only_results_on_stdout_and_logs_on_stderr(broker: LocalBroker,
                                                                prefix: str) -> None:
    result = Result(frame_id="f-1", task_id="t-1", source="cam-9", status="ok", label=3, confidence=0.9,
                    exit_index=1)
    with subprocess.Popen([*OFFRAMP, "--log-level", "info", "watch", "--broker", broker.url,
                           "--prefix", prefix, "--count", "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t",
                            f"{prefix}/results/cam-9", "-m", result.to_json()], check=True,
                           timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and Result.from_json(lines[0].encode()).frame_id == "f-1"
    assert "bus_connected" in err


def test_watch_lines_fit_80_columns_and_filter_by_status(broker: LocalBroker,
                                                         prefix: str) -> None:
    """--lines: one line of 80 columns per frame, a refusal one per frame it lists; --status
    keeps the chosen outcomes only."""
    ok = Result(frame_id="frame-with-a-rather-long-name-17", task_id="t-1", source="cam-9",
                status="ok", label=3, class_name="Ankle boot", confidence=0.91, exit_index=2,
                latency_ms={"total": 12.5}, ts=1.8e9)
    err = Result(frame_id="f-2", task_id="t-2", source="cam-9", status="error",
                 error="not an image: " + "x" * 200, ts=1.8e9)
    refusal = Refusal(source="cam-9", frames={"over the admitted rate": ["f-3", "f-4"]}, ts=1.8e9)
    for wanted, expect in (("", 4), ("dropped,error", 3)):
        with subprocess.Popen([*OFFRAMP, "watch", "--broker", broker.url, "--prefix", prefix,
                               "--lines", "--status", wanted, "--count", str(expect)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                for payload in (ok.to_json(), err.to_json(), refusal.to_json()):
                    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t",
                                    f"{prefix}/results/cam-9", "-m", payload], check=True,
                                   timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
            out, errs = proc.communicate(timeout=30)
        assert proc.returncode == 0, errs
        lines = out.splitlines()
        assert len(lines) >= expect and all(len(line) <= 80 for line in lines), lines
        statuses = {line.split()[3] for line in lines}
        if wanted:
            assert statuses == {"dropped", "error"}, lines
        else:
            row = next(line for line in lines if " ok " in line)
            assert "Ankle boot" in row and "exit 2" in row and "12.5 ms" in row, row
            assert "frame-with-a-rat…" in row
    bad = subprocess.run([*OFFRAMP, "watch", "--broker", broker.url, "--status", "fine"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "fine is not a status" in bad.stderr


def _heartbeat(node: str, done: int, rate: float = 5000.0) -> Heartbeat:
    return Heartbeat(node=node, role="worker", online=True, device="cpu", segments=(
        SegmentLoad(model="m", segment=2, queued=3, backlog_s=0.004, service_rate=rate,
                    mean_batch=2.0, exited=done // 2, forwarded=done - done // 2),))


def test_live_view_fits_80_columns_and_shows_what_was_done() -> None:
    view = LiveView()
    view.add_state(_heartbeat("orin-nano-0", 0), now=100.0)
    view.add_state(_heartbeat("orin-nano-0", 0), now=101.0)
    idle = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    idle.print(view.render(now=101.0))
    text = idle.export_text()
    # idle: nothing done per second, although the segment could do thousands
    row = next(line for line in text.splitlines() if "orin-nano-0" in line)
    assert row.split()[5] == "0" and row.split()[6] == "5000"
    view.add_state(_heartbeat("orin-nano-0", 240), now=103.0)
    for i in range(10):
        view.add_result(Result(frame_id=f"f{i}", task_id=f"t{i}", source="cam-1", status="ok", label=1,
                               confidence=0.9, exit_index=1 + i % 2,
                               latency_ms={"total": 10.0 + i}), now=102.0)
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(view.render(now=103.0))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert console.measure(view.render(now=103.0)).maximum <= 80
    row = next(line for line in text.splitlines() if "orin-nano-0" in line)
    assert row.split()[5] == "120"  # 240 samples in 2 s
    assert "exit shares" in text and "1:0.50 2:0.50" in text
    assert "no result" not in text


def test_live_view_shows_each_source_and_its_pace() -> None:
    view = LiveView()
    topics = Topics("t")
    view.add_pace(topics, Message(topics.pace("cam-1"), Pace(source="cam-1", rate_hz=812.4,
                                                             by="a", ts=1.0).to_json()))
    view.add_pace(topics, Message(topics.pace("cam-gone"), Pace(source="cam-gone", rate_hz=5,
                                                                by="a", ts=1.0).to_json()))
    view.add_pace(topics, Message(topics.pace("cam-gone"), b""))  # withdrawn
    view.add_pace(topics, Message(topics.pace("cam-2"), b"garbage"))  # ignored
    for i in range(10):
        view.add_result(Result(frame_id=f"f{i}", task_id="", source="cam-1",
                               status="ok" if i < 6 else "dropped"), now=1.0)
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(view.render(now=2.0))
    text = console.export_text()
    row = next(line for line in text.splitlines() if line.strip().startswith("cam-1"))
    assert row.split() == ["cam-1", "2.0", "1.2", "0.8", "0.0", "812"], row
    assert "cam-gone" not in text and "cam-2" not in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_live_view_names_frames_that_get_no_result() -> None:
    """Frames on a topic that names no source, or repeating a frame id, get no result by the
    README's rules; the live view says how many, and which log event tells more."""
    view = LiveView()
    for node, n in (("admission-1", 3.0), ("admission-2", 1.0)):
        view.add_state(Heartbeat(node=node, role="admission", online=True, stats={
            "invalid_sources": n, "duplicate_frames": 2.0, "unserved": 0.0, "ok": 50.0}))
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(view.render(now=1.0))
    text = " ".join(console.export_text().split())
    assert "no result: 4 on a topic naming no valid source (invalid_source); 4 repeating" in text
    assert "bundle_unserved" not in text
    view.add_state(Heartbeat(node="admission-1", role="admission", online=True,
                             stats={"unserved": 7.0}))
    console.print(view.render(now=1.0))
    assert "7 answered error: no worker serves this bundle" in console.export_text()


def test_broker_is_taken_as_host_and_port_and_a_bad_one_is_named_as_given() -> None:
    from offramp.cli.args import bus_settings
    from offramp.errors import SettingsError

    def args(broker: str) -> argparse.Namespace:
        return argparse.Namespace(broker=broker, prefix="offramp/v1")

    assert bus_settings(args("127.0.0.1:1883")).broker_url == "mqtt://127.0.0.1:1883"
    assert bus_settings(args("gateway")).broker_url == "mqtt://gateway"
    assert bus_settings(args("mqtts://gw:8883")).broker_url == "mqtts://gw:8883"
    for bad, said in (("http://gw:1883", "--broker='http://gw:1883': expected mqtt://"),
                      ("gw:port", "--broker='mqtt://gw:port': bad port")):
        with pytest.raises(SettingsError) as caught:
            bus_settings(args(bad))
        assert said in str(caught.value)


def test_watch_gives_up_on_a_broker_that_is_not_there() -> None:
    """As publish does: one line naming the broker, not retries for ever."""
    from offramp.local.broker import free_run

    port = free_run(1, port_base(19700))
    done = subprocess.run([*OFFRAMP, "watch", "--broker", f"127.0.0.1:{port}",
                           "--connect-timeout", "1"], check=False, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0
    assert f"no connection to mqtt://127.0.0.1:{port} within 1.0 s" in done.stderr, done.stderr


def test_broker_stopped_by_sigterm_leaves_no_files_behind() -> None:
    import signal
    from pathlib import Path

    proc = subprocess.Popen([*OFFRAMP, "broker"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        config = Path(line.split("(config ")[1].split(")")[0])
        assert config.is_file(), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert not config.parent.exists(), sorted(config.parent.iterdir())
