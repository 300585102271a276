"""offramp's wire format: msgpack messages, tensors as buffer views, a JSON result per frame."""

from offramp.wire.messages import (
    CRITERIA,
    EXIT_REASONS,
    ActivationPacket,
    Completion,
    Criterion,
    ExitPolicy,
    ExitReason,
    FrameEnvelope,
    Heartbeat,
    Hop,
    Plan,
    Sample,
    SegmentLoad,
    SegmentRef,
)
from offramp.wire.reader import DEFAULT_MAX_BYTES, VERSION
from offramp.wire.result import STATUSES, Result, Status
from offramp.wire.tensor import CODECS, Codec, Tensor

__all__ = [
    "CODECS", "CRITERIA", "DEFAULT_MAX_BYTES", "EXIT_REASONS", "STATUSES", "VERSION",
    "ActivationPacket", "Codec", "Completion", "Criterion", "ExitPolicy", "ExitReason",
    "FrameEnvelope", "Heartbeat", "Hop", "Plan", "Result", "Sample", "SegmentLoad", "SegmentRef",
    "Status", "Tensor",
]
