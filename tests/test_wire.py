"""Wire format: round trips for every message, and strict decoding of anything else."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from offramp.errors import WireError
from offramp.wire import (
    ActivationPacket,
    Completion,
    DoneReport,
    ExitPolicy,
    FrameEnvelope,
    Grant,
    Heartbeat,
    Hop,
    Plan,
    Refusal,
    Result,
    Sample,
    SegmentLoad,
    SegmentRef,
    SentCount,
    Tensor,
    Want,
    read_results,
)

text = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
hops = st.builds(Hop, node=text, segment=st.integers(1, 9), arrived=finite, started=finite,
                 finished=finite)


def samples(n: int) -> st.SearchStrategy[tuple[Sample, ...]]:
    one = st.builds(Sample, task_id=text, source=text, frame_id=text,
                    priority=st.floats(0.01, 100), created=finite, deadline=st.none() | finite,
                    attempt=st.integers(0, 5), hops=st.tuples(hops) | st.just(()))
    return st.lists(one, min_size=n, max_size=n).map(tuple)


@st.composite
def packets(draw: st.DrawFn) -> ActivationPacket:
    batch = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(["float32", "float16", "int8", "uint8", "int64"]))
    shape = (batch, *draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))
    arr = draw(hnp.arrays(dtype, shape))
    emb = draw(st.none() | hnp.arrays("float32", (batch, 4), elements=st.floats(-1, 1, width=32)))
    return ActivationPacket(model=draw(text), segment=draw(st.integers(1, 9)), samples=draw(samples(batch)),
                            tensor=Tensor.encode(arr), embedding=None if emb is None else Tensor.encode(emb),
                            sent=draw(finite), sender=draw(st.just("") | text), sender_boot=draw(finite))


@given(packets())
def test_activation_packet_round_trips(packet: ActivationPacket) -> None:
    back = ActivationPacket.decode(packet.encode())
    assert back.samples == packet.samples
    assert (back.model, back.segment, back.sent) == (packet.model, packet.segment, packet.sent)
    np.testing.assert_array_equal(back.tensor.to_numpy(), packet.tensor.to_numpy())
    if packet.embedding is not None:
        assert back.embedding is not None
        np.testing.assert_array_equal(back.embedding.to_numpy(), packet.embedding.to_numpy())


@given(hnp.arrays("float32", hnp.array_shapes(max_dims=4, max_side=6),
                  elements=st.floats(-1e4, 1e4, width=32)))
def test_lossy_codecs_stay_within_their_error_bound(arr: np.ndarray) -> None:
    fp16 = Tensor.decode_bytes(Tensor.encode(arr, "fp16"))
    np.testing.assert_allclose(fp16, arr, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(arr).max()))
    int8 = Tensor.decode_bytes(Tensor.encode(arr, "int8"))
    step = np.abs(arr).max() / 127 if arr.size and np.abs(arr).max() > 0 else 1.0
    assert np.all(np.abs(int8 - arr) <= step / 2 + 1e-3 * step)
    assert fp16.dtype == np.float32 and int8.dtype == np.float32


def test_raw_decode_is_a_view_of_the_payload_not_a_copy() -> None:
    arr = np.arange(64 * 1024 // 4, dtype=np.float32).reshape(1, -1)
    packet = ActivationPacket(model="m", segment=2, samples=(Sample(task_id="t", source="s", frame_id="f"),),
                              tensor=Tensor.encode(arr))
    payload = packet.encode()
    decoded = ActivationPacket.decode(payload).tensor.to_numpy()
    assert not decoded.flags.owndata
    np.testing.assert_array_equal(decoded, arr)


def test_fp16_halves_the_bytes() -> None:
    arr = np.ones((2, 32, 16, 16), np.float32)
    assert Tensor.encode(arr, "fp16").nbytes == arr.nbytes // 2
    assert Tensor.encode(arr, "int8").nbytes == arr.nbytes // 4


loads = st.builds(SegmentLoad, model=text, segment=st.integers(1, 9), queued=st.integers(0, 99),
                  backlog_s=finite, service_rate=finite, mean_batch=finite,
                  exited=st.integers(0, 9), forwarded=st.integers(0, 9), bound=st.integers(0, 999),
                  by_priority=st.lists(st.tuples(finite, st.integers(0, 99)), max_size=3).map(tuple),
                  credits=st.dictionaries(text, st.builds(Grant, boot=finite,
                                                          limit=st.integers(0, 10**6)),
                                          max_size=3))


wants = st.builds(Want, model=text, segment=st.integers(1, 9), priority=finite,
                  count=st.integers(0, 99))
sent = st.builds(SentCount, receiver=text, receiver_boot=finite, model=text,
                 segment=st.integers(1, 9), count=st.integers(0, 10**6))
refs = st.builds(SegmentRef, model=text, segment=st.integers(1, 9))


@given(st.builds(Heartbeat, role=text, node=text, online=st.booleans(), seq=st.integers(0, 2**40),
                 ts=finite, segments=st.lists(loads, max_size=3).map(tuple), flops_per_s=finite,
                 stats=st.dictionaries(text, finite, max_size=3), boot=finite,
                 wants=st.lists(wants, max_size=3).map(tuple),
                 sent=st.lists(sent, max_size=3).map(tuple), link_bps=finite, link_rtt_s=finite,
                 loadable=st.lists(refs, max_size=3).map(tuple), max_segments=st.integers(0, 9),
                 device=st.sampled_from(["", "cpu", "cuda", "tensorrt"]), draining=st.booleans()))
def test_heartbeat_round_trips(hb: Heartbeat) -> None:
    assert Heartbeat.decode(hb.encode()) == hb


def test_heartbeat_from_a_sender_that_does_not_say_its_device_decodes() -> None:
    wire = msgpack.unpackb(Heartbeat(role="worker", node="n1", device="cuda").encode())
    del wire["device"]
    assert Heartbeat.decode(msgpack.packb(wire)).device == ""


def test_heartbeat_from_a_sender_that_does_not_say_whether_it_drains_decodes() -> None:
    wire = msgpack.unpackb(Heartbeat(role="worker", node="n1", draining=True).encode())
    assert Heartbeat.decode(msgpack.packb(wire)).draining
    del wire["draining"]
    assert not Heartbeat.decode(msgpack.packb(wire)).draining


completions = st.builds(Completion, task_id=text, source=text, frame_id=text,
                        attempt=st.integers(0, 5), label=st.integers(0, 999), confidence=finite,
                        exit_index=st.integers(1, 9),
                        reason=st.sampled_from(["threshold", "final", "deadline",
                                                "feature-difference"]),
                        node=text, ts=finite, hops=st.lists(hops, max_size=3).map(tuple),
                        thresholds=st.lists(finite, max_size=4).map(tuple), created=finite)


@given(st.lists(completions, min_size=1, max_size=4).map(tuple))
def test_done_report_round_trips(items: tuple[Completion, ...]) -> None:
    report = DoneReport(completions=items)
    assert DoneReport.decode(report.encode()) == report


@pytest.mark.parametrize(("field", "value", "words"), [
    ("reason", "maybe", r"items\[0\]\.reason: 'maybe' is not one of"),
    ("conf", float("nan"), r"items\[0\]\.conf: must be finite"),
    ("thr", [0.9, "high"], r"items\[0\]\.thr\[1\]\._: expected a number"),
    ("label", True, r"items\[0\]\.label: expected an integer, got bool"),
    ("hops", [["n", 1, 0.0, 0.0]], "a hop has 5 fields"),
])
def test_a_bad_completion_field_is_named(field: str, value: object, words: str) -> None:
    done = Completion(task_id="t", source="cam", frame_id="f", attempt=0, label=3, confidence=0.9,
                      exit_index=1, reason="threshold", node="n", ts=1.0,
                      hops=(Hop(node="n", segment=1, arrived=0.0, started=0.5, finished=1.0),),
                      thresholds=(0.8,), created=0.5)
    wire = msgpack.unpackb(DoneReport(completions=(done,)).encode(), raw=False)
    wire["items"][0][field] = value
    with pytest.raises(WireError, match=words):
        DoneReport.decode(msgpack.packb(wire, use_bin_type=True))


def test_an_empty_done_report_is_refused() -> None:
    with pytest.raises(WireError, match="at least one completion"):
        DoneReport(completions=())


@given(st.builds(Plan, epoch=st.integers(0, 10**6), ts=finite,
                 nodes=st.dictionaries(text, st.lists(refs, max_size=3).map(tuple), max_size=3),
                 routes=st.dictionaries(text, st.dictionaries(st.integers(1, 9), text, max_size=3),
                                        max_size=3),
                 expected_s=st.dictionaries(text, finite, max_size=3), reason=text))
def test_plan_round_trips(plan: Plan) -> None:
    assert Plan.decode(plan.encode()) == plan


@given(st.builds(ExitPolicy, model=text, epoch=st.integers(0, 99), ts=finite,
                 criterion=st.sampled_from(["confidence", "entropy", "margin",
                                            "feature-difference"]),
                 thresholds=st.lists(st.floats(0, 1), max_size=4).map(tuple),
                 target_accuracy=st.none() | st.floats(0, 1), expected_accuracy=st.floats(0, 1)))
def test_exit_policy_round_trips(policy: ExitPolicy) -> None:
    assert ExitPolicy.decode(policy.encode()) == policy


def test_frame_envelope_round_trips_with_image_or_tensor() -> None:
    img = FrameEnvelope(frame_id="f1", ts=1.5, image=b"\x89PNG...", deadline=2.0, label=3)
    assert FrameEnvelope.decode(img.encode()) == img
    ten = FrameEnvelope(frame_id="f2", ts=1.5, tensor=Tensor.encode(np.zeros((3, 8, 8), np.float32)))
    back = FrameEnvelope.decode(ten.encode())
    assert back.tensor is not None and back.tensor.shape == (3, 8, 8)
    with pytest.raises(WireError, match="exactly one"):
        FrameEnvelope(frame_id="f3", ts=0.0)


@given(st.builds(Result, task_id=text, source=text, frame_id=text,
                 status=st.sampled_from(["ok", "dropped", "expired", "error"]),
                 label=st.none() | st.integers(0, 9), class_name=st.none() | text,
                 confidence=st.none() | st.floats(0, 1), exit_index=st.none() | st.integers(1, 5),
                 reason=st.none() | text, error=st.none() | text,
                 latency_ms=st.dictionaries(text, st.floats(0, 1e4), max_size=3),
                 nodes=st.lists(text, max_size=3), thresholds=st.lists(st.floats(0, 1), max_size=3),
                 ts=finite))
def test_result_json_round_trips(result: Result) -> None:
    assert Result.from_json(result.to_json()) == result


# -- strict decoding ------------------------------------------------------------------------

DECODERS = [ActivationPacket.decode, Heartbeat.decode, DoneReport.decode, Plan.decode,
            ExitPolicy.decode, FrameEnvelope.decode]


@settings(max_examples=300)
@given(st.binary(max_size=512), st.sampled_from(DECODERS))
def test_random_bytes_raise_only_wire_error(data: bytes, decode: Callable[[bytes], Any]) -> None:
    """Garbage is one WireError; what does decode is a whole message: it encodes again to
    bytes that decode to the same message."""
    try:
        message = decode(data)
    except WireError:
        return
    assert type(message).decode(message.encode()) == message


def _valid_packet() -> bytes:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    return ActivationPacket(model="m", segment=1,
                            samples=(Sample(task_id="a", source="s", frame_id="f"),
                                     Sample(task_id="b", source="s", frame_id="g")),
                            tensor=Tensor.encode(arr)).encode()


@given(st.data())
def test_truncated_and_bit_flipped_packets_raise_only_wire_error(data: st.DataObject) -> None:
    payload = bytearray(_valid_packet())
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WireError):
        ActivationPacket.decode(bytes(payload[:cut]))
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(WireError):
        ActivationPacket.decode(bytes(payload))


def _tamper(**changes: object) -> bytes:
    obj = msgpack.unpackb(_valid_packet(), raw=False)
    for path, value in changes.items():
        node = obj
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(("changes", "words"), [
    ({"v": 9}, "unsupported format version 9"),
    ({"k": "hb"}, "not a 'act'"),
    ({"seg": "two"}, "act.seg: expected an integer"),
    ({"tensor__shape": [2, 3, 5]}, "needs 120 bytes, got 96"),
    ({"tensor__dtype": "complex128"}, "act.tensor.dtype"),
    ({"tensor__codec": "zstd"}, "act.tensor.codec"),
    ({"tensor__shape": [2, -3, -4]}, "negative dimension"),
    ({"samples": []}, "at least one sample"),
    ({"sent": float("nan")}, "act.sent: must be finite"),
    ({"sent": float("-inf")}, "act.sent: must be finite"),
    ({"sent": True}, "act.sent: expected a number, got bool"),
    ({"samples__0__prio": 0}, "priority must be > 0"),
    ({"samples__0__hops": [["n", 1, 0.0]]}, "a hop has 5 fields"),
    ({"samples__0__hops": [["n", 1, 0.0, 0.0, 0.0], ["n", True, 0.0, 0.0, 0.0]]},
     r"act\.samples\[0\]\.hops\[1\]\[1\]\._: expected an integer, got bool"),
    ({"samples__0__hops": [["n", 1, 0.0, float("inf"), 0.0]]}, r"hops\[0\]\[3\]\._: must be finite"),
    ({"samples__0__hops": [{"node": "n"}]}, r"hops\[0\]: expected an array"),
    ({"samples__0__hops": [[7, 1, 0.0, 0.0, 0.0]]}, "expected a string"),
])
def test_wrong_fields_are_named_in_the_error(changes: dict[str, object], words: str) -> None:
    with pytest.raises(WireError, match=words):
        ActivationPacket.decode(_tamper(**changes))


def test_batch_size_must_match_the_sample_headers() -> None:
    obj = msgpack.unpackb(_valid_packet(), raw=False)
    obj["samples"] = obj["samples"][:1]
    with pytest.raises(WireError, match="does not match 1 samples"):
        ActivationPacket.decode(msgpack.packb(obj, use_bin_type=True))


def test_over_limit_messages_are_rejected_before_unpacking() -> None:
    payload = _valid_packet()
    with pytest.raises(WireError, match="over the limit"):
        ActivationPacket.decode(payload, max_bytes=len(payload) - 1)


def test_a_refusal_reads_as_one_dropped_result_per_frame() -> None:
    refusal = Refusal(source="cam-1", frames={"over the admitted rate": ["f1", "f2"],
                                              "ingest queue full": ["f3"]}, ts=12.5)
    assert len(refusal) == 3
    got = read_results(refusal.to_json())
    assert [(r.frame_id, r.status, r.error, r.task_id, r.source, r.ts) for r in got] == [
        ("f1", "dropped", "over the admitted rate", "", "cam-1", 12.5),
        ("f2", "dropped", "over the admitted rate", "", "cam-1", 12.5),
        ("f3", "dropped", "ingest queue full", "", "cam-1", 12.5)]
    one = Result(task_id="t", source="cam-1", frame_id="f9", status="ok", label=3)
    assert read_results(one.to_json()) == [one]


def test_read_results_rejects_garbage_and_malformed_refusals() -> None:
    for bad in (b"\xff", b"[]", b'{"v": 1, "kind": "refused", "source": "s"}',
                b'{"v": 1, "kind": "refused", "source": "s", "frames": {"r": [1]}}',
                b'{"v": 1, "kind": "refused", "source": 3, "frames": {}}',
                b'{"v": 2, "kind": "refused", "source": "s", "frames": {}}',
                b'{"v": 1, "kind": "refused", "source": "s", "frames": {}, "extra": 1}',
                b'{"v": 1, "kind": "refused", "source": "s", "frames": {}, "ts": "now"}'):
        with pytest.raises(WireError):
            read_results(bad)


def test_result_from_json_rejects_garbage() -> None:
    for bad in (b"\xff", b"[]", b'{"v": 1}', b'{"v": 2, "task_id": "t"}'):
        with pytest.raises(WireError):
            Result.from_json(bad)
    with pytest.raises(WireError, match="status"):
        Result(task_id="t", source="s", frame_id="f", status="maybe")  # type: ignore[arg-type]
