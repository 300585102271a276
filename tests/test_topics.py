"""Topics: every builder parses back to what built it; anything else is one TopicError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offramp.bus import ParsedTopic, Topics
from offramp.errors import TopicError

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")


@given(source=names, model=names, node=names, segment=st.integers(1, 999))
def test_every_topic_round_trips(source: str, model: str, node: str, segment: int) -> None:
    t = Topics("site/a/offramp")
    assert t.parse(t.ingest(source)) == ParsedTopic("ingest", source=source)
    assert t.parse(t.results(source)) == ParsedTopic("results", source=source)
    assert t.parse(t.done(source)) == ParsedTopic("done", source=source)
    assert t.parse(t.act(model, segment)) == ParsedTopic("act", model=model, segment=segment)
    assert t.parse(t.act(model, segment, node)) == ParsedTopic("act", model=model,
                                                               segment=segment, node=node)
    assert t.parse(t.state("worker", node)) == ParsedTopic("state", role="worker", node=node)
    assert t.parse(t.exit_policy(model)) == ParsedTopic("exit-policy", model=model)
    assert t.parse(t.source(source)) == ParsedTopic("source", source=source)
    assert t.parse(t.plan()) == ParsedTopic("plan")


def test_default_prefix_matches_the_architecture() -> None:
    assert Topics().ingest("cam-1") == "offramp/v1/ingest/cam-1"
    assert Topics().act("mnv2", 2, "jetson-3") == "offramp/v1/act/mnv2/2/jetson-3"
    assert Topics.shared("workers", "offramp/v1/act/m/1") == "$share/workers/offramp/v1/act/m/1"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "cam 1", "-x", "a" * 129])
def test_bad_names_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        Topics().ingest(bad)


@pytest.mark.parametrize("topic", [
    "other/v1/ingest/cam", "offramp/v1/ingest", "offramp/v1/act/m/x", "offramp/v1/act/m/0",
    "offramp/v1/state/robot/n", "offramp/v1/control/unknown", "offramp/v1/ingest/a/b",
])
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("prefix", ["", "a//b", "a/+/b", "#"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix)


def test_segment_and_role_are_checked() -> None:
    with pytest.raises(TopicError):
        Topics().act("m", 0)
    with pytest.raises(TopicError):
        Topics().state("robot", "n1")
