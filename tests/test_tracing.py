"""Traces across hops: with OFFRAMP_TRACE_SAMPLE=1 and the file exporter in every service, each
frame of a real stream through real services is one complete trace, reassembled by trace id:
admission's decode, queue and dispatch, each segment on its worker with queue wait and compute,
the transfers between workers, the exit and the answer, all under the frame's span."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_system import FAST, _frames, _run

from offramp.errors import SettingsError
from offramp.local.system import LocalSystem
from offramp.model.bundle import Bundle
from offramp.node.tracing import Tracing
from offramp.settings import TraceSettings, load
from offramp.wire import ActivationPacket, Sample, Tensor

pytestmark = pytest.mark.tier("inproc")


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_every_frame_is_one_complete_trace_across_the_services(
        tiny_bundle: Bundle, prefix: str, tmp_path: Path) -> None:
    _, payloads = _frames(60)
    # what this test checks is the traces, not how soon a stalled frame is given up: with
    # another test worker busy beside it, 35 of 60 frames once went 1.5 s without progress
    env = {**FAST, "OFFRAMP_ADMISSION_PROGRESS_TIMEOUT_S": "10",
           "OFFRAMP_TRACE_SAMPLE": "1", "OFFRAMP_TRACE_EXPORTER": "file",
           "OFFRAMP_TRACE_FILE": str(tmp_path / "{node}.jsonl"),
           "OFFRAMP_WORKER_FOLLOW_PLAN": "false"}
    with LocalSystem(tiny_bundle, 0, prefix=prefix, env=env) as system:
        # segment 1 on worker-1, the rest on worker-2: every frame that goes on crosses a link
        system.add_worker("worker-1", (1,))
        system.add_worker("worker-2", tuple(range(2, tiny_bundle.num_segments + 1)))
        system.workers = 2
        results = asyncio.run(_run(system, payloads))
        codes = system.stop()  # each service exports what it holds on the way out
    assert set(codes.values()) == {0}, codes
    assert Counter(r.status for r in results) == {"ok": len(payloads)}
    spans: list[dict[str, Any]] = [json.loads(line) for f in tmp_path.glob("*.jsonl")
                                   for line in f.read_text().splitlines()]
    traces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        traces[s["context"]["trace_id"]].append(s)
    frame_trace = {s["attributes"]["offramp.frame_id"]: s["context"]["trace_id"]
                   for s in spans if s["name"] == "frame"}
    assert set(frame_trace) == {r.frame_id for r in results}
    assert len(traces) == len(results)  # no span outside a frame's trace
    for r in results:
        trace = traces[frame_trace[r.frame_id]]
        root = next(s for s in trace if s["name"] == "frame")
        ids = {s["context"]["span_id"] for s in trace}
        assert root["parent_id"] is None
        assert all(s["parent_id"] in ids for s in trace if s is not root), "a dangling parent"
        names = Counter(s["name"] for s in trace)
        assert names["decode"] == names["dispatch"] == names["exit"] == names["answer"] == 1
        exit_at = r.exit_index
        assert exit_at is not None
        for seg in range(1, exit_at + 1):
            assert names[f"segment {seg}"] == 1, (seg, names)
        # queue: at admission, and in each segment; compute in each segment
        assert names["queue"] == 1 + exit_at and names["compute"] == exit_at
        # segment 1 and the rest are on different workers: one transfer each way in, the
        # hand-overs between segments 2.. on worker-2 are placements, not transfers
        transfers = sorted(n for n in names if n.startswith("transfer"))
        assert transfers == ["transfer to segment 1"] + (["transfer to segment 2"]
                                                         if exit_at >= 2 else [])
        assert all(names[f"placement for segment {k}"] <= 1 for k in range(2, exit_at + 1))
        services = {s["resource"]["attributes"]["service.name"] for s in trace}
        assert services == {"offramp-admission", "offramp-worker"}
        workers = {s["attributes"]["offramp.node"] for s in trace
                   if s["name"].startswith("segment ")}
        assert workers == ({"worker-1", "worker-2"} if exit_at >= 2 else {"worker-1"})
        start, end = _time(root["start_time"]), _time(root["end_time"])
        assert all(start - 1e-3 <= _time(s["start_time"]) and _time(s["end_time"]) <= end + 1e-3
                   for s in trace), "a span outside its frame's time"
        exit_span = next(s for s in trace if s["name"] == "exit")
        assert exit_span["attributes"]["offramp.exit"] == exit_at
        assert exit_span["attributes"]["offramp.label"] == r.label


def test_tracing_off_leaves_the_wire_as_it_was() -> None:
    plain = Sample(task_id="t", source="cam", frame_id="f")
    assert "trace" not in plain.to_wire()
    traced = Sample(task_id="t", source="cam", frame_id="f",
                    trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    import numpy as np

    packet = ActivationPacket(model="m", segment=1, samples=(traced, plain),
                              tensor=Tensor.encode(np.zeros((2, 3), np.float32)))
    back = ActivationPacket.decode(packet.encode())
    assert [s.trace for s in back.samples] == [traced.trace, None]
    off = Tracing(TraceSettings(), "worker", "w")
    assert not off.enabled and off.start_frame(0.0, {}) is None
    assert off.record(traced.trace, "x", 0.0, 1.0) is None


def test_trace_settings_fail_clearly() -> None:
    with pytest.raises(SettingsError, match="needs OFFRAMP_TRACE_FILE"):
        load(TraceSettings, "OFFRAMP_TRACE_", {"OFFRAMP_TRACE_SAMPLE": "0.1",
                                               "OFFRAMP_TRACE_EXPORTER": "file"})
    with pytest.raises(SettingsError, match="OFFRAMP_TRACE_SAMPLE"):
        load(TraceSettings, "OFFRAMP_TRACE_", {"OFFRAMP_TRACE_SAMPLE": "2"})
    with pytest.raises(SettingsError, match="OFFRAMP_TRACE_FILE='/nonexistent/x'"):
        Tracing(TraceSettings(sample=1.0, exporter="file", file="/nonexistent/x"), "worker", "w")
