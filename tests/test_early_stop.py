"""The early-stopping rules on hand-made learning curves: which trials stop, at which step, and why."""

from __future__ import annotations

import pytest

from hpsweep.engine.early_stop import (EarlyStopRule, StopTracker, asha_rule, expected_fraction, median_rule,
                                       quantile)


def curve(*values: float) -> list[tuple[int, float]]:
    return list(enumerate(values, start=1))


GOOD = [curve(0.5, 0.7, 0.8, 0.85, 0.9), curve(0.4, 0.6, 0.75, 0.8, 0.88), curve(0.45, 0.65, 0.7, 0.82, 0.86)]


def test_median_stops_a_trial_whose_best_is_below_the_median_of_the_others_running_averages():
    bad = curve(0.1, 0.2, 0.3, 0.35, 0.4)
    # the others' running averages at step 3: 0.6667, 0.5833, 0.6 → median 0.6 > best 0.3
    assert median_rule(bad, 3, GOOD) == "stopped at step 3: val_f1 0.3000 < median 0.6000 of 3 trials"


def test_median_waits_for_min_steps_and_for_three_others():
    bad = curve(0.1, 0.2, 0.3, 0.35, 0.4)
    assert median_rule(bad, 2, GOOD, min_steps=3) is None  # too early
    assert median_rule(bad, 3, GOOD[:2]) is None  # only two others reached step 3
    short = [curve(0.9, 0.9)] * 3  # three others, none reached step 3
    assert median_rule(bad, 3, short) is None


def test_median_keeps_a_trial_whose_best_so_far_beats_the_median():
    late = curve(0.1, 0.2, 0.65, 0.66, 0.67)  # best 0.65 at step 3 ≥ median 0.6
    assert median_rule(late, 3, GOOD) is None
    # its best so far counts, not its latest value
    dip = curve(0.1, 0.7, 0.3)
    assert median_rule(dip, 3, GOOD) is None


def test_asha_stops_at_a_rung_what_is_not_in_the_top_third_of_those_that_reached_it():
    rungs, rf = (2, 6), 3
    others = [curve(0.9, 0.9), curve(0.8, 0.85), curve(0.5, 0.6), curve(0.4, 0.45), curve(0.3, 0.35)]
    # values at rung 2 (with mine, 0.5): 0.9, 0.85, 0.6, 0.5, 0.45, 0.35 → 2/3 quantile 0.6833 → stop
    reason = asha_rule(curve(0.2, 0.5), 2, others, rungs=rungs, reduction_factor=rf)
    assert reason == ("stopped at step 2 (ASHA rung 1): val_f1 0.5000 not in the top 1/3 of 6 trials "
                      "(cutoff 0.6833)")
    assert asha_rule(curve(0.2, 0.86), 2, others, rungs=rungs, reduction_factor=rf) is None  # top third
    assert asha_rule(curve(0.2, 0.5, 0.5), 3, others, rungs=rungs, reduction_factor=rf) is None  # not a rung


def test_asha_lets_the_first_trials_at_a_rung_go_on():
    assert asha_rule(curve(0.1, 0.1), 2, [], rungs=(2,), reduction_factor=3) is None


def test_rungs_grow_by_the_reduction_factor_below_max_steps():
    assert EarlyStopRule("asha", min_steps=3, reduction_factor=3, max_steps=30).rungs() == [3, 9, 27]
    assert EarlyStopRule("asha", min_steps=2, reduction_factor=3, max_steps=18).rungs() == [2, 6]


def test_quantile_interpolates_like_numpy():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([5], 0.9) == 5


@pytest.mark.parametrize("rule, stopped", [
    ("median", {"bad": (3, "stopped at step 3: val_f1 0.3000 < median 0.6000 of 3 trials")}),
    ("none", {}),
])
def test_the_tracker_judges_each_reported_step_once_in_order(rule, stopped):
    tracker = StopTracker(EarlyStopRule(rule))
    histories = {"a": GOOD[0], "b": GOOD[1], "c": GOOD[2], "bad": curve(0.1, 0.2)}
    assert tracker.decide(["bad"], histories) == {}  # step 2: before min_steps
    histories["bad"] = curve(0.1, 0.2, 0.3, 0.35)
    assert tracker.decide(["bad"], histories) == stopped  # steps 3 and 4 arrive together: 3 decides
    assert tracker.decide(["bad"], histories) == {}  # nothing new reported: nothing judged again


def test_the_tracker_stops_exactly_the_bad_trials_of_a_population():
    rule = EarlyStopRule("asha", min_steps=2, reduction_factor=2, max_steps=8)
    tracker = StopTracker(rule)
    finals = {"t1": 0.9, "t2": 0.3, "t3": 0.8, "t4": 0.2}
    histories = {t: [(s, f * s / 8) for s in range(1, 9)] for t, f in finals.items()}
    # All four report together: each judged against all the others at rung 2 (cutoff: the median).
    assert {t: step for t, (step, _) in tracker.decide(list(finals), histories).items()} == {"t2": 2, "t4": 2}


def test_expected_fraction_of_asha_is_successive_halving_at_best():
    rule = EarlyStopRule("asha", min_steps=2, reduction_factor=3, max_steps=18)
    low, high = expected_fraction(rule, 81, 4)
    # 81 trials × 2 steps, 27 × 4 more, 9 × 12 more, of 81 × 18
    assert low == pytest.approx((81 * 2 + 27 * 4 + 9 * 12) / (81 * 18))
    assert low < high < 1
    assert expected_fraction(EarlyStopRule("none"), 81, 4) == (1.0, 1.0)
