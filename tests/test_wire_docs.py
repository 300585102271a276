"""docs/wire.md names every field each message carries: a message is built with every optional
field set, and each key of what it encodes to (nested maps included) must be written, in
backticks, in that message's paragraph of the document."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from offramp.wire import (
    ActivationPacket,
    Completion,
    DoneReport,
    ExitPolicy,
    Failed,
    FrameEnvelope,
    Grant,
    Heartbeat,
    Hop,
    Moved,
    Plan,
    Refused,
    Sample,
    SegmentLoad,
    SegmentRef,
    SentCount,
    Tensor,
    Want,
)
from offramp.wire.base import WireMessage

pytestmark = pytest.mark.tier("pure")

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire.md"
HOP = Hop(node="w1", segment=1, arrived=1.0, started=1.1, finished=1.2)
SAMPLE = Sample(task_id="t", source="cam", frame_id="f", deadline=9.0, hops=(HOP,),
                trace="00-0123-4567-01")
TENSOR = Tensor.encode(np.zeros((1, 2), np.float32), "int8")

# each message, and where its paragraph starts in docs/wire.md
MESSAGES: list[tuple[str, WireMessage]] = [
    ("**Frame envelope**", FrameEnvelope(frame_id="f", ts=1.0, image=b"png", deadline=2.0,
                                         label=3)),
    ("**Activation packet**", ActivationPacket(
        model="m", segment=2, samples=(SAMPLE,), tensor=TENSOR, embedding=TENSOR, sent=1.0,
        sender="w1", sender_boot=1.0)),
    ("**Done report**", DoneReport(
        completions=(Completion(task_id="t", source="cam", frame_id="f", attempt=1, label=2,
                                confidence=0.9, exit_index=1, reason="threshold", node="w1",
                                ts=1.0, hops=(HOP,), thresholds=(0.9,), created=0.5),),
        moved=(Moved(task_id="t", attempt=1, node="w2"),),
        failed=(Failed(task_id="t", attempt=1, error="bad"),),
        refused=(Refused(task_id="t", attempt=1, reason="full"),))),
    ("**Heartbeat**", Heartbeat(
        role="admission", node="a1", seq=1, ts=1.0, boot=1.0, flops_per_s=1e9,
        segments=(SegmentLoad(model="m", segment=1, queued=1, by_priority=((1.0, 1),),
                              credits={"w2": Grant(boot=1.0, limit=4)}),),
        stats={"ok": 1.0}, wants=(Want(model="m", segment=1, priority=1.0, count=2),),
        sent=(SentCount(receiver="w2", receiver_boot=1.0, model="m", segment=1, count=3),),
        link_bps=1e6, link_rtt_s=0.01, loadable=(SegmentRef(model="m", segment=1),),
        max_segments=2, device="cpu", draining=True, paths={"w2": 1e6}, queue_s=0.1,
        bundle="m@0123", group="admission", active_since=5.0, arrivals={"cam": 7.0})),
    ("**Plan**", Plan(epoch=1, ts=1.0, nodes={"w1": (SegmentRef(model="m", segment=1),)},
                      routes={"cam": {1: "w1"}}, expected_s={"cam": 0.1}, reason="load")),
    ("**Exit policy**", ExitPolicy(model="m", epoch=1, ts=1.0, criterion="confidence",
                                   thresholds=(0.9,), target_accuracy=0.9, expected_accuracy=0.95,
                                   dataset="digits", bundle="m@0123")),
]
# keys of maps keyed by data (node names, sources, senders), not field names
DATA_KEYED = {"credits", "stats", "paths", "arrivals", "nodes", "routes", "expected"}


def _keys(value: Any, keyed_by_data: bool = False) -> set[str]:
    """Every field name in an unpacked message, nested maps and lists included."""
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if not keyed_by_data and not str(k).isdigit():  # a route's segment numbers: data
                out.add(str(k))
            out |= _keys(v, str(k) in DATA_KEYED)
    elif isinstance(value, list):
        for v in value:
            out |= _keys(v)
    return out


def _paragraph(start: str) -> str:
    """From ``start`` to the next message's paragraph (or the next section)."""
    text = DOC.read_text()
    begin = text.index(start)
    ends = [i for i in (text.find("\n**", begin + 1), text.find("\n## ", begin + 1)) if i > 0]
    return text[begin:min(ends)]


@pytest.mark.parametrize(("start", "message"), MESSAGES, ids=[m[0].strip("*") for m in MESSAGES])
def test_every_field_a_message_carries_is_in_its_paragraph_of_wire_md(
        start: str, message: WireMessage) -> None:
    body = msgpack.unpackb(message.encode(), raw=False)
    assert type(message).decode(message.encode()) == message  # the example is a whole message
    tensor_fields = _keys(TENSOR.to_wire())  # documented once, in the tensor's paragraph
    written = set(re.findall(r"`([a-z_]+)`", _paragraph(start)))
    missing = _keys(body) - {"v", "k"} - tensor_fields - written
    assert not missing, f"docs/wire.md's {start} paragraph does not name {sorted(missing)}"


def test_the_tensor_paragraph_names_every_tensor_field() -> None:
    written = set(re.findall(r"`([a-z_]+)`", _paragraph("**Tensor**")))
    assert _keys(TENSOR.to_wire()) <= written
