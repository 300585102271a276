"""A segment-worker's metrics, read at each scrape from the parts that keep them."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from offramp.node.metrics import Reading
from segment_worker.placer import Placer
from segment_worker.segments import Segments


class Drops(Protocol):
    """The engine's counts of samples given up at intake."""

    bad_packets: int
    misrouted: int
    expired: int


def read_metrics(r: Reading, segments: Segments, placer: Placer, drops: Drops,
                 transfers: Counter[str], uplink: tuple[float, float]) -> None:
    """Queues, samples, credit, parked work, the link, codecs, device copies and drops."""
    for seg, h in segments.items():
        r.gauge("offramp_queue_length", "Samples queued, by segment", len(h.queue), segment=seg)
        r.gauge("offramp_queue_backlog_seconds", "Queued work in seconds, by segment",
                len(h.queue) * h.stats.service_s, segment=seg)
        r.counter("offramp_samples_total", "Samples computed, by segment", h.stats.samples,
                  segment=seg)
        r.counter("offramp_samples_exited_total", "Samples that exited, by segment",
                  h.stats.exited, segment=seg)
        r.gauge("offramp_credit_outstanding", "Credit granted to senders and not yet used, by "
                "segment", h.ledger.outstanding(), segment=seg)
    r.gauge("offramp_parked", "Samples waiting for a neighbour's credit", placer.parked())
    rate, rtt = uplink
    r.gauge("offramp_link_bytes_per_second", "This node's link as measured (0: not yet)", rate)
    r.gauge("offramp_link_rtt_seconds", "Round trip to the broker as measured", rtt)
    for codec, n in sorted(placer.by_codec.items()):
        r.counter("offramp_codec_samples_total", "Samples sent to other nodes, by codec", n,
                  codec=codec)
    for kind in ("to_device", "to_host", "on_device"):
        r.counter("offramp_device_copies_total", "Batches copied by the resident path: "
                  "to_device, to_host, or gathered on the device (exited rows dropped)",
                  transfers[kind], kind=kind)
    r.counter("offramp_packets_split_total", "Batches sent as several packets because one "
              "would not fit the broker's packet limit", placer.split)
    for reason, n in (("queue-overflow", segments.queue_overflow),
                      ("bad-packet", drops.bad_packets), ("misrouted", drops.misrouted),
                      ("expired", drops.expired), ("park-timeout", placer.park_expired),
                      ("too-large", placer.too_large)):
        r.counter("offramp_drops_total", "Samples given up here, by reason (their frame is "
                  "dispatched again by the admission-controller)", n, reason=reason)
