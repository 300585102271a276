"""What recently answered frames were told (admission_controller.answers): kept for the dedup
window and up to a count, the oldest going first; pure."""

from __future__ import annotations

from admission_controller.answers import Answers, Told


def test_an_answer_is_kept_for_the_window_and_then_forgotten() -> None:
    answers = Answers(keep_s=10.0, max_kept=100)
    answers.keep("cam", "f1", Told(result=b'{"status":"ok"}'), now=0.0)
    answers.keep("cam", "f2", Told(refused="over the admitted rate"), now=5.0)
    assert answers.told("cam", "f1", now=9.0) == Told(result=b'{"status":"ok"}')
    assert answers.told("cam", "f2", now=9.0) == Told(refused="over the admitted rate")
    assert answers.told("other", "f1", now=9.0) is None  # per source
    assert answers.told("cam", "f1", now=10.5) is None and len(answers) == 1
    assert answers.told("cam", "f2", now=15.5) is None and len(answers) == 0


def test_the_count_bound_forgets_the_oldest_first_and_counts_it() -> None:
    answers = Answers(keep_s=60.0, max_kept=3)
    for i in range(5):
        answers.keep("cam", f"f{i}", Told(result=str(i).encode()), now=float(i))
    assert len(answers) == 3 and answers.evicted == 2
    assert answers.told("cam", "f1", now=5.0) is None
    assert answers.told("cam", "f4", now=5.0) == Told(result=b"4")
    answers.keep("cam", "f2", Told(result=b"again"), now=6.0)  # kept anew: now the youngest
    answers.keep("cam", "f5", Told(result=b"5"), now=7.0)
    assert answers.told("cam", "f2", now=7.0) == Told(result=b"again")
    assert answers.told("cam", "f3", now=7.0) is None


def test_a_zero_window_or_count_keeps_nothing() -> None:
    for keep_s, max_kept in ((0.0, 10), (10.0, 0)):
        answers = Answers(keep_s, max_kept)
        answers.keep("cam", "f1", Told(result=b"x"), now=0.0)
        assert len(answers) == 0 and answers.told("cam", "f1", now=0.0) is None


async def test_a_refusal_told_again_is_published_again_and_counted_once() -> None:
    import time

    import structlog

    from admission_controller.refusals import Refusals
    from offramp.bus import Topics
    from offramp.wire import read_results

    published: list[tuple[str, bytes]] = []
    counted: list[tuple[str, int]] = []

    async def publish(topic: str, payload: bytes) -> None:
        published.append((topic, payload))

    answers = Answers(keep_s=10.0, max_kept=100)
    refusals = Refusals(topics=Topics("t"), publish=publish, acknowledge=lambda msg: None,
                        count=lambda source, n: counted.append((source, n)),
                        log=structlog.get_logger(), interval_s=1.0, max_pending=100,
                        answers=answers)
    refusals.add("cam", "f1", "over the admitted rate", None)
    await refusals.flush()
    assert answers.told("cam", "f1", time.monotonic()) == Told(refused="over the admitted rate")
    refusals.add("cam", "f1", "over the admitted rate", None, again=True)
    await refusals.flush()
    told = [[(r.frame_id, r.status, r.error) for r in read_results(p)] for _, p in published]
    assert told == [[("f1", "dropped", "over the admitted rate")]] * 2
    assert counted == [("cam", 1), ("cam", 0)]  # one frame refused, told twice
