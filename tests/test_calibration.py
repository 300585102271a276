"""Calibration and threshold selection, pure numpy (no I/O), plus the stored curves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.model.bundle import Bundle
from offramp.model.calibration import NEVER, Calibration
from offramp.policy.scores import score

pytestmark = pytest.mark.tier("inproc")


def _synthetic(n: int = 400, seed: int = 0) -> Calibration:
    """Later exits are more accurate; confidence predicts correctness."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.1, 1.0, (n, 3)).astype(np.float32)
    skill = np.array([0.6, 0.8, 0.95])
    correct = rng.uniform(0, 1, (n, 3)) < np.clip(conf * 0.5 + skill * 0.5, 0, 1)
    return Calibration({"confidence": conf}, correct, np.array([0.3, 0.6, 1.05]))


def test_closed_exits_send_everything_to_the_final_exit() -> None:
    c = _synthetic()
    out = c.simulate("confidence", (NEVER, NEVER))
    assert out.shares == (0.0, 0.0, 1.0)
    assert out.accuracy == pytest.approx(c.exit_accuracy()[-1])
    assert out.flops_fraction == pytest.approx(1.05)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 0.95), st.integers(0, 50))
def test_thresholds_for_accuracy_meet_the_target_when_possible(target: float, seed: int) -> None:
    c = _synthetic(seed=seed)
    thr = c.thresholds_for_accuracy("confidence", target)
    out = c.simulate("confidence", thr)
    if c.exit_accuracy()[-1] >= target:
        assert out.accuracy >= target
    assert all(0.0 <= t <= NEVER for t in thr)


def test_the_margin_keeps_thresholds_off_the_edge_of_the_validation_errors() -> None:
    """Exit 1 is right on 90 of 100 samples, the final exit on all: "final - 5 points" is just
    met by letting the 56 most confident samples (5 of them wrong) leave at exit 1. With a
    margin, the accuracy given up must clear the 5 points by z standard errors, so fewer leave
    there; closing every exit gives up nothing and meets any target up to the final's."""
    conf = np.linspace(1.0, 0.01, 100, dtype=np.float32)[:, None].repeat(2, axis=1)
    correct = np.ones((100, 2), bool)
    correct[[1, 12, 23, 34, 45, 56, 67, 78, 89, 99], 0] = False
    c = Calibration({"confidence": conf}, correct, np.array([0.2, 1.0]))
    bare = c.thresholds_for_accuracy("confidence", 0.95, margin_z=0.0)
    assert c.simulate("confidence", bare).accuracy == pytest.approx(0.95)
    assert c.simulate("confidence", bare).shares[0] == pytest.approx(0.56)
    safe = c.thresholds_for_accuracy("confidence", 0.95, margin_z=1.645)
    out = c.simulate("confidence", safe)
    assert safe[0] > bare[0] and 0 < out.shares[0] < 0.56
    right = correct[np.arange(100), c.exit_index("confidence", safe)]
    given_up = correct[:, -1].astype(float) - right
    assert out.accuracy - 1.645 * given_up.std(ddof=1) / 10 >= 0.95
    assert c.meets("confidence", (NEVER,), 1.0, margin_z=3.0)
    assert not c.meets("confidence", (0.0,), 0.95)


def test_lower_targets_save_more_compute() -> None:
    c = _synthetic()
    final = c.exit_accuracy()[-1]
    costs = [c.simulate("confidence", c.thresholds_for_accuracy("confidence", final - d))
             .flops_fraction for d in (0.0, 0.05, 0.15)]
    assert costs[0] >= costs[1] >= costs[2]
    assert costs[2] < costs[0]


@pytest.mark.parametrize("budget", [0.4, 0.7, 1.0])
def test_budget_thresholds_respect_the_budget(budget: float) -> None:
    c = _synthetic()
    out = c.simulate("confidence", c.thresholds_for_budget("confidence", budget))
    assert out.flops_fraction <= budget + 1e-9


def test_dict_round_trip_and_validation() -> None:
    c = _synthetic()
    back = Calibration.from_dict(c.to_dict())
    thr = (0.7, 0.8)
    assert back.simulate("confidence", thr) == pytest.approx(c.simulate("confidence", thr))
    with pytest.raises(ValueError, match="need 2 thresholds"):
        c.simulate("confidence", (0.5,))
    with pytest.raises(ValueError, match="do not match"):
        Calibration({"confidence": np.zeros((3, 2))}, np.zeros((3, 3), bool), np.ones(3))


def test_curves_and_ece_have_the_documented_shape() -> None:
    c = _synthetic()
    curves = c.curves("confidence", points=11)
    assert len(curves) == 3 and len(curves[0]["threshold"]) == 11
    assert curves[0]["share"][0] == 1.0 and curves[0]["share"] == sorted(curves[0]["share"],
                                                                        reverse=True)
    assert all(0 <= e <= 1 for e in c.ece())


def test_scores_are_in_unit_range_and_ordered() -> None:
    sure = np.array([[10.0, 0, 0], [1.0, 1.0, 1.0]])
    for crit in ("confidence", "entropy", "margin"):
        s = score(crit, sure)
        assert s[0] > s[1] and np.all((s >= 0) & (s <= 1))
    z = np.array([[1.0, 0.0], [1.0, 0.0]])
    prev = np.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(score("feature-difference", sure, z, prev), [1.0, 0.0])
    assert np.all(score("feature-difference", sure) == 0)
    with pytest.raises(ValueError, match="unknown exit criterion"):
        score("vibes", sure)


def test_real_bundle_calibration_gives_useful_thresholds(tiny_bundle: Bundle) -> None:
    c = tiny_bundle.calibration()
    assert set(c.scores) == {"confidence", "entropy", "margin", "feature-difference"}
    target = c.exit_accuracy()[-1] - 0.01
    out = c.simulate("confidence", c.thresholds_for_accuracy("confidence", target))
    assert out.accuracy >= target and out.flops_fraction < 1.0
