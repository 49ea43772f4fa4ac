"""pixelrun/experiments/stats.py against hand computations: where the bootstrap distribution of a mean is known
exactly (0/1 data: Binomial(n, p) / n), where it has no spread (constant data, an effect that is the
same on every prompt and seed), and a t interval worked out from a t table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from pixelrun.experiments import stats


def binomial_interval(n: int, k: int) -> tuple[float, float]:
    """The 2.5 % and 97.5 % quantiles of the mean of n draws with replacement from k ones and n - k zeros."""
    low, high = binom.ppf([0.025, 0.975], n, k / n)
    return low / n, high / n


def test_bootstrap_of_zero_one_data_is_the_binomial_interval():
    x = np.array([1] * 12 + [0] * 28)
    est = stats.bootstrap_mean(x, resamples=20_000)
    low, high = binomial_interval(40, 12)
    assert est.estimate == pytest.approx(0.3)
    # the bootstrap quantile is an atom of Binomial(40, 0.3) / 40, or between two neighbouring ones
    assert est.low == pytest.approx(low, abs=1 / 40)
    assert est.high == pytest.approx(high, abs=1 / 40)
    assert (est.n, est.method) == (40, "bootstrap")


@pytest.mark.parametrize("axis", [0, 1])
def test_two_level_bootstrap_with_one_varying_level_is_the_binomial_interval(axis):
    """Cells equal along one level: resampling that level changes nothing, so the mean's distribution
    is Binomial(30, 0.3) / 30 over the other level (seeds when axis=0, prompts when axis=1)."""
    ones = (np.arange(30) < 9).astype(float)
    data = np.repeat(ones[:, None], 5, axis=1) if axis == 0 else np.repeat(ones[None, :], 4, axis=0)
    est = stats.two_level_bootstrap(data, resamples=20_000)
    low, high = binomial_interval(30, 9)
    assert est.estimate == pytest.approx(0.3)
    assert est.low == pytest.approx(low, abs=1 / 30)
    assert est.high == pytest.approx(high, abs=1 / 30)
    assert est.method == "two-level bootstrap"


def test_constant_data_gives_a_zero_width_interval():
    one = stats.bootstrap_mean(np.full(10, 0.7))
    two = stats.two_level_bootstrap(np.full((3, 8), 0.7))
    for est in (one, two):
        assert est.low == pytest.approx(0.7, abs=1e-12) and est.high == pytest.approx(0.7, abs=1e-12)


def test_paired_difference_cancels_what_both_arms_share():
    """variant = baseline + c on every seed and prompt: whatever the prompts and seeds do, every
    resample's mean difference is c, so the interval is [c, c]."""
    baseline = np.random.default_rng(1).random((3, 50))
    est = stats.paired_bootstrap(baseline + 0.1, baseline)
    assert est.estimate == pytest.approx(0.1, abs=1e-12)
    assert est.low == pytest.approx(0.1, abs=1e-12) and est.high == pytest.approx(0.1, abs=1e-12)
    assert (est.n, est.prompts) == (3, 50)
    # unpaired, the same arms would show the baseline's whole spread
    assert stats.two_level_bootstrap(baseline + 0.1).high - stats.two_level_bootstrap(baseline + 0.1).low > 0.05


def test_paired_t_interval_by_hand():
    """Differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), n 4; t(0.975, 3 df) = 3.182446 from a t table."""
    baseline = np.array([10.0, 20.0, 30.0, 40.0])
    est = stats.paired_t(baseline + [1, 2, 3, 4], baseline)
    half = 3.182446 * math.sqrt(5 / 3) / math.sqrt(4)
    assert est.estimate == pytest.approx(2.5)
    assert est.low == pytest.approx(2.5 - half, abs=1e-6)
    assert est.high == pytest.approx(2.5 + half, abs=1e-6)
    assert (est.n, est.method) == (4, "t")


def test_one_seed_has_no_t_interval_and_says_so():
    est = stats.paired_t([0.5], [0.4])
    assert est.estimate == pytest.approx(0.1)
    assert (est.low, est.high, est.n, est.note) == (None, None, 1, "one seed: no interval")
    assert stats.verdict(est, higher_is_better=True) == "no interval"


def test_one_seed_bootstrap_covers_prompts_only_and_says_so():
    est = stats.paired_bootstrap([[1.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0, 0.0]])
    assert (est.n, est.prompts, est.method) == (1, 4, "bootstrap")
    assert est.low is not None and "not seed-to-seed" in est.note


@pytest.mark.parametrize(
    "low, high, higher_is_better, expected",
    [
        (0.01, 0.05, True, "better"),
        (0.01, 0.05, False, "worse"),
        (-0.05, -0.01, True, "worse"),
        (-0.05, -0.01, False, "better"),
        (-0.01, 0.05, True, "within noise"),
        (0.0, 0.05, True, "within noise"),
    ],
)
def test_verdict_by_interval_and_direction(low, high, higher_is_better, expected):
    est = stats.Estimate((low + high) / 2, low, high, 2, "t")
    assert stats.verdict(est, higher_is_better) == expected


def test_noise_floor_is_the_spread_of_per_seed_means():
    floor = stats.noise_floor([0.5, 0.7, 0.6])
    assert floor["std"] == pytest.approx(0.1)
    assert floor["range"] == pytest.approx(0.2)
    assert (floor["n"], floor["min"], floor["max"]) == (3, 0.5, 0.7)
    assert stats.noise_floor([0.5])["std"] is None


def test_intervals_are_reproducible_from_their_seed():
    data = np.random.default_rng(2).random((3, 20))
    assert stats.two_level_bootstrap(data, seed=5) == stats.two_level_bootstrap(data, seed=5)
    assert stats.bootstrap_mean(data[0], seed=5) == stats.bootstrap_mean(data[0], seed=5)
    assert stats.two_level_bootstrap(data, seed=5).low != stats.two_level_bootstrap(data, seed=6).low


def test_arms_that_do_not_pair_are_refused():
    with pytest.raises(ValueError, match="must pair seed by seed"):
        stats.paired_bootstrap(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2 variant seeds but 3 baseline seeds"):
        stats.paired_t([1, 2], [1, 2, 3])
