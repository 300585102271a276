"""Which codec an activation crosses a link with (after MDI-Exit, whose autoencoders shrink
what a cut sends): the one with the least expected time per sample,

    encode_s + bytes_per_sample / link rate + decode_s,

among the codecs whose accuracy cost (points of final-exit accuracy lost, measured by
calibration) is within the budget. ``raw`` costs nothing and loses nothing, so there is always a
choice. With the link's rate unknown (0) the transfer term is unknown too, and the choice is
the cheapest to compute: ``raw`` until the link has been measured.

Pure: options and the rate are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CodecOption:
    codec: str  # raw, fp16, int8 or ae
    bytes_per_sample: int
    encode_s: float = 0.0  # per sample, on the sender
    decode_s: float = 0.0  # per sample, on the receiver
    loss: float | None = 0.0  # final-exit accuracy points lost; None: never measured

    def cost_s(self, link_bytes_per_s: float) -> float:
        transfer = self.bytes_per_sample / link_bytes_per_s if link_bytes_per_s > 0 else 0.0
        return self.encode_s + transfer + self.decode_s


def choose_codec(options: Sequence[CodecOption], link_bytes_per_s: float, *,
                 max_loss: float) -> CodecOption:
    """The cheapest option within ``max_loss`` points (ties: the fewer bytes). An option whose
    loss was never measured is not chosen (only ``raw`` is known to lose nothing)."""
    allowed = [o for o in options if o.codec == "raw" or
               (o.loss is not None and o.loss <= max_loss)]
    if not allowed:
        raise ValueError("no codec to choose from: raw must be among the options")
    return min(allowed, key=lambda o: (o.cost_s(link_bytes_per_s), o.bytes_per_sample, o.codec))
