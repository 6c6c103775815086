"""Bootstrap intervals and paired comparisons (ltbench.stats) against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ltbench.stats import RunClasses, cell_interval, paired_difference, seed_interval


def test_three_seed_interval_is_the_range_when_each_extreme_resample_is_likelier_than_2_5_percent():
    # With 3 values the resampled mean equals the smallest value with probability 1/27 = 3.7 % > 2.5 %, so the
    # percentile interval is exactly [min, max].
    assert seed_interval([1.0, 2.0, 3.0]) == pytest.approx((1.0, 3.0))
    assert math.isnan(seed_interval([5.0])[0]) and seed_interval([4.0, 4.0]) == (4.0, 4.0)


def test_paired_difference_significant_and_not():
    gain = paired_difference([71.0, 72.0, 73.0], [70.0, 70.0, 70.0])  # differences 1, 2, 3
    assert (gain.mean, gain.low, gain.high) == pytest.approx((2.0, 1.0, 3.0)) and gain.significant
    assert gain.p_improve == 1.0
    mixed = paired_difference([69.0, 70.5, 72.0], [70.0, 70.0, 70.0])  # differences -1, 0.5, 2: contains 0
    assert (mixed.mean, mixed.low, mixed.high) == pytest.approx((0.5, -1.0, 2.0)) and not mixed.significant
    # P(a run beats a baseline run) over the 9 pairs: 72 beats all three 70s, 70.5 too, 69 none -> 6/9
    assert mixed.p_improve == pytest.approx(6 / 9)
    ties = paired_difference([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])  # pairs won 1+1.5+2 = 4.5 of 9 (a tie counts half)
    assert ties.p_improve == pytest.approx(4.5 / 9)
    lower = paired_difference([4.0, 5.0], [6.0, 7.0], lower_is_better=True)  # ECE: lower wins
    assert lower.p_improve == 1.0 and lower.mean == -2.0


def test_stratified_image_bootstrap_matches_the_binomial_standard_error():
    # One run, 10 classes x 1000 images at 70 %: top-1 has standard error sqrt(.7 * .3 / 10000) = 0.458 points,
    # so the 95 % interval is about 70 -+ 0.90.
    run = RunClasses(np.full(10, 70.0), np.full(10, 1000))
    low, high = cell_interval([run], None)
    assert low == pytest.approx(70 - 0.898, abs=0.12) and high == pytest.approx(70 + 0.898, abs=0.12)
    # The same accuracy on a tail group of 10 images per class is far less certain: the resampling is by class.
    tail = RunClasses(np.array([70.0] * 8 + [70.0, 70.0]), np.array([1000] * 8 + [10, 10]))
    t_low, t_high = cell_interval([tail], [8, 9])
    half = 1.96 * math.sqrt(0.7 * 0.3 / 20) * 100  # 20 images in the group: 20 points
    assert (t_high - t_low) / 2 == pytest.approx(half, rel=0.25) and (t_high - t_low) > 10 * (high - low)


def test_a_class_right_everywhere_has_no_image_variance_and_seeds_add_theirs():
    perfect = RunClasses(np.full(4, 100.0), np.full(4, 50))
    assert cell_interval([perfect], None) == (100.0, 100.0)
    # identical runs on the same images share the image resample: more of them do not shrink the interval
    run = RunClasses(np.full(10, 70.0), np.full(10, 1000))
    one, three = cell_interval([run], None), cell_interval([run] * 3, None)
    assert three[1] - three[0] == pytest.approx(one[1] - one[0], rel=0.1)
    apart = cell_interval([run, RunClasses(np.full(10, 74.0), np.full(10, 1000))], None)
    assert apart[0] < 70.5 and apart[1] > 73.5  # the seeds' spread dominates
