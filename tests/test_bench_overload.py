"""``make bench-overload``'s bookkeeping, on made-up answers: every frame's first outcome
counted once, refusals read as read_results reads them, never-answered frames by the second
they were sent."""

from __future__ import annotations

from bench.overload import Phase, outcomes
from offramp.wire import Refusal, Result, read_results


def test_the_bench_reads_results_and_refusals_as_the_library_does() -> None:
    refusal = Refusal(source="cam-1", frames={"over the admitted rate": ["a", "b"],
                                              "ingest queue full": ["c"]}, ts=1.0)
    result = Result(task_id="t", source="cam-1", frame_id="d", status="error", error="bad")
    for payload in (refusal.to_json(), result.to_json()):
        assert outcomes(payload, 5.0) == [(r.frame_id, r.status, r.error or "", 5.0)
                                          for r in read_results(payload)]


def test_a_phase_counts_each_frame_once_and_the_unanswered_by_their_second() -> None:
    phase = Phase(rate=4.0, sent={"f0": 100.0, "f1": 100.2, "f2": 101.1, "f3": 101.4})
    phase.answers = [("f0", "ok", "", 100.1), ("f1", "dropped", "over the admitted rate", 100.3),
                     ("f0", "ok", "", 100.5),  # answered again: counted as such, not twice
                     ("f2", "ok", "", 102.6), ("elsewhere", "ok", "", 101.0)]
    s = phase.summary()
    assert s["sent"] == 4 and s["never_answered"] == 1 and s["answered_twice"] == 1
    assert s["answered_share"] == 0.75 and s["status"] == {"ok": 2, "dropped": 1}
    assert s["not_served"] == {"over the admitted rate": 1}
    assert s["per_second"] == [{"s": 0, "ok": 1, "refused": 1}, {"s": 1, "never": 1},
                               {"s": 2, "ok": 1}]
    assert s["p50_ok_ms"] is not None and s["p99_ok_ms"] <= 1500.0
