"""Copies of segments for capacity (offramp.policy.replicas), and the plan that uses them: a
plan must not leave a node idle while another runs the whole model (#26.4)."""

from __future__ import annotations

import pytest

from offramp.policy.plan import ModelInfo, NodeInfo, SourceLoad, plan
from offramp.policy.replicas import add_copies, levels

# the 224x224 EfficientNet-Lite0 bench bundle's segments: FLOPs and exits' reach
EFFNET = ModelInfo("effnet", [151_640_576, 162_913_152, 172_047_104, 281_607_488],
                   [150_560] * 4, [1.0, 0.8, 0.6, 0.5])


def _nodes(*speeds: float, max_segments: int = 0, segments: int = 4) -> list[NodeInfo]:
    return [NodeInfo(f"worker-{i}", s, frozenset(range(1, segments + 1)), max_segments,
                     2e6, 0.002) for i, s in enumerate(speeds, start=1)]


def _bottleneck(model: ModelInfo, nodes: list[NodeInfo], hosted: dict[str, set[int]]) -> float:
    hosts = [{n for n, segs in hosted.items() if k in segs} for k in range(1, len(model.flops) + 1)]
    demand = [r * f for r, f in zip(model.reach, model.flops, strict=True)]
    return max(levels(demand, hosts, {n.node: n.flops_per_s for n in nodes}))


@pytest.mark.parametrize("rate", [1.0, 10.0, 60.0, 400.0])
def test_equal_nodes_without_a_limit_each_host_the_whole_model(rate: float) -> None:
    """At every rate the routes put one source's chain on one node (no transfers); the copies
    make every node a host of every segment, so that placement can share the frames: before
    them, 3 workers at 224x224 kept one core busy."""
    nodes = _nodes(40e9, 40e9, 40e9)
    alloc = plan(EFFNET, nodes, [SourceLoad("cam", 1.0, rate)])
    assert len(set(alloc.routes["cam"].values())) == 1
    assert alloc.nodes == {n.node: {1, 2, 3, 4} for n in nodes}


def test_limited_room_still_reaches_the_least_bottleneck() -> None:
    """12 nodes of three speeds, 3 segments each, 8 equal segments, 5 sources: the copies
    bring the busiest node to total demand / total speed, the best any split can do."""
    model = ModelInfo("m", [100_000_000] * 8, [1000] * 8, [1.0] * 8)
    nodes = [NodeInfo(f"n{i:02d}", 40e9 * (1 + i % 3), frozenset(range(1, 9)), 3, 2e6, 0.002)
             for i in range(12)]
    alloc = plan(model, nodes, [SourceLoad(f"s{j}", 1.0 + j, 20.0) for j in range(5)])
    assert all(len(segs) == 3 for segs in alloc.nodes.values())
    ideal = sum(model.flops) / sum(n.flops_per_s for n in nodes)
    assert _bottleneck(model, nodes, alloc.nodes) == pytest.approx(ideal)


def test_tied_sets_each_get_copies() -> None:
    """Segments {1} and {2} each on their own node bind U* together: no single copy lowers it,
    so the levels below decide and both get a second host."""
    hosted: dict[str, set[int]] = {"a": {1}, "b": {2}, "c": set(), "d": set()}
    added = add_copies(hosted, [10.0, 10.0], dict.fromkeys("abcd", 1.0),
                       lambda node, k: len(hosted[node]) < 1)
    assert sorted(added) == [("c", 1), ("d", 2)]
    assert levels([10.0, 10.0], [{"a", "c"}, {"b", "d"}], dict.fromkeys("abcd", 1.0)) == [5.0, 5.0]


def test_copies_of_the_plan_in_force_are_kept_while_there_is_room() -> None:
    """Room left after U* goes first to the copies the last plan gave (here segment 4 rather
    than 2, which is next to 3 as well), so that a moving rate does not make a worker unload
    and load again; a node that is gone is skipped."""
    def run(current: dict[str, set[int]] | None) -> dict[str, set[int]]:
        hosted: dict[str, set[int]] = {"a": {1, 2, 3, 4}, "b": {3}}
        add_copies(hosted, [0.0, 0.0, 1.0, 0.0], {"a": 1.0, "b": 1.0},
                   lambda node, k: len(hosted[node]) < 2 or node == "a", current)
        return hosted

    assert run(None)["b"] == {2, 3}
    assert run({"b": {3, 4}, "gone": {1}})["b"] == {3, 4}


def test_a_segment_no_node_can_load_is_left_without_a_host() -> None:
    """The copies never break a node's loadable set or its limit, and a segment nobody can
    load leaves the plan incomplete (the scheduler then keeps the plan in force)."""
    nodes = [NodeInfo("a", 1e9, frozenset({1}), 0), NodeInfo("b", 1e9, frozenset({1, 2}), 1)]
    alloc = plan(ModelInfo("m", [10, 10, 10], [1, 1, 1], [1.0, 1.0, 1.0]), nodes,
                 [SourceLoad("cam", 1.0, 1.0)])
    assert alloc.nodes["a"] == {1} and len(alloc.nodes["b"]) == 1
    assert not any(3 in segs for segs in alloc.nodes.values())
