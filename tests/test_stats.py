"""wasearch/stats.py: the binomial standard error against a simulation, the rule that calls two
accuracies the same, and the pick that follows from it."""

from __future__ import annotations

import math
import random

import pytest

from wasearch import stats


@pytest.mark.parametrize(("acc", "n"), [(0.6672, 5000), (0.93, 1000), (0.1, 200), (0.5, 64)])
def test_binomial_se_matches_a_simulation(acc, n):
    """The spread of accuracies of a classifier right with probability ``acc`` on ``n``
    independent images, over many simulated validation sets."""
    rng = random.Random(0)
    draws = [sum(rng.random() < acc for _ in range(n)) / n for _ in range(2000)]
    assert stats.binomial_se(acc, n) == pytest.approx(stats.spread(draws), rel=0.05)


def test_binomial_se_of_the_issue_and_its_edges():
    # 67 % on 5,000 images: about 0.66 points.
    assert 100 * stats.binomial_se(0.67, 5000) == pytest.approx(0.665, abs=0.001)
    assert stats.binomial_se(1.0, 100) == 0.0
    for acc, n in ((None, 10), (0.5, None), (0.5, 0), (math.nan, 10), (True, 10)):
        assert stats.binomial_se(acc, n) is None


def test_indistinguishable_uses_the_standard_error_of_the_difference():
    se = stats.binomial_se(0.667, 5000)
    # 0.1 point apart on 5,000 images each: the same.
    assert stats.indistinguishable(0.6672, se, 0.6680, se)
    # sqrt(2) standard errors apart: different at 1, the same at 1.5.
    gap = 1.2 * se
    assert stats.indistinguishable(0.6, se, 0.6 + gap, se)  # 1.2 se < sqrt(2) se
    assert not stats.indistinguishable(0.6, se, 0.6 + 1.5 * se, se)
    assert stats.indistinguishable(0.6, se, 0.6 + 1.5 * se, se, tolerance=1.5)
    # Unknown errors: only equal accuracies are the same.
    assert stats.indistinguishable(0.6, None, 0.6, None)
    assert not stats.indistinguishable(0.6, None, 0.6001, None)


def test_pick_is_the_fastest_within_the_tolerance_of_the_best():
    se = stats.binomial_se(0.667, 5000)
    acc = [0.6680, 0.6672, 0.6400, 0.6690]
    cost = [3.95, 3.27, 2.0, 5.0]
    pick = stats.pick_fastest(acc, [se] * 4, cost)
    assert pick.best == 3 and pick.index == 1 and set(pick.within) == {0, 1, 3}
    # Tolerance 0: the most accurate.
    assert stats.pick_fastest(acc, [se] * 4, cost, tolerance=0).index == 3
    # Against a reference (all-normal at 66.9 %): the same here, and better ones count too.
    ref = stats.pick_fastest(acc, [se] * 4, cost, reference=(0.6690, se))
    assert ref.index == 1
    # A cost tie goes to the more accurate; an unknown cost ranks last.
    assert stats.pick_fastest([0.5, 0.51], [0.1, 0.1], [1.0, 1.0]).index == 1
    assert stats.pick_fastest([0.5, 0.51], [0.1, 0.1], [None, 2.0]).index == 1
    assert stats.pick_fastest([], [], []) is None


def test_trial_se_reads_the_record_or_computes_it():
    assert stats.trial_se({"val_acc": 0.5, "val_se": 0.01}) == 0.01
    assert stats.trial_se({"val_acc": 0.5, "val_images": 100}) == pytest.approx(0.05)
    assert stats.trial_se({"val_acc": 0.5}) is None
    assert stats.fmt_acc_se(0.6672, 0.00666) == "66.72% ± 0.67"
    assert stats.fmt_acc_se(0.6672, None) == "66.72%"
