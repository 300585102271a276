"""offramp's wire format: msgpack messages, tensors as buffer views, a JSON result per frame."""

from offramp.wire.control import ExitPolicy, Plan, SegmentRef
from offramp.wire.messages import (
    CRITERIA,
    EXIT_REASONS,
    ActivationPacket,
    Completion,
    Criterion,
    DoneReport,
    ExitReason,
    Failed,
    FrameEnvelope,
    Hop,
    Moved,
    Refused,
    Sample,
)
from offramp.wire.pace import Pace
from offramp.wire.reader import DEFAULT_MAX_BYTES, VERSION
from offramp.wire.result import STATUSES, Refusal, Result, Status, read_results
from offramp.wire.state import Grant, Heartbeat, SegmentLoad, SentCount, Want
from offramp.wire.tensor import CODECS, Codec, Tensor

__all__ = [
    "CODECS", "CRITERIA", "DEFAULT_MAX_BYTES", "EXIT_REASONS", "STATUSES", "VERSION",
    "ActivationPacket", "Codec", "Completion", "Criterion", "DoneReport", "ExitPolicy", "ExitReason",
    "Failed", "FrameEnvelope", "Grant", "Heartbeat", "Hop", "Moved", "Pace", "Plan", "Refusal", "Refused",
    "Result", "Sample",
    "SegmentLoad", "SegmentRef", "SentCount", "Status", "Tensor", "Want", "read_results",
]
