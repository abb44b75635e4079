"""The bootstrap interval helper on inputs with known answers."""

import numpy as np
import pytest

from helpers.core.stats import Estimate, bootstrap, mean_estimate, paired_difference


def test_constant_data_gives_a_point_interval():
    est = mean_estimate([np.ones(10), np.ones(12)])
    assert est.value == est.low == est.high == 1.0
    assert est.n == "10 × 2" and est.n_total == 20


def test_mean_of_seed_means_and_coverage_of_a_known_proportion():
    rng = np.random.default_rng(1)
    per_seed = [rng.random(400) < 0.7 for _ in range(3)]
    est = mean_estimate(per_seed, seeds=False)
    assert est.value == pytest.approx(np.mean([x.mean() for x in per_seed]))
    # binomial standard error of the pooled mean: sqrt(.21 / 1200) = 0.0132 -> 95% half-width ~ 0.026
    assert 0.018 < (est.high - est.low) / 2 < 0.034
    # resampling three seeds without a seed effect adds the seeds' own sampling noise: wider, not wildly so
    both = mean_estimate(per_seed)
    assert both.hierarchical and (est.high - est.low) < (both.high - both.low) < 2.5 * (est.high - est.low)
    assert est.contains(0.7)
    assert est.seed_std == pytest.approx(np.std([x.mean() for x in per_seed], ddof=1))


def test_interval_shrinks_with_more_examples():
    rng = np.random.default_rng(2)
    small = mean_estimate([rng.random(20) < 0.5])
    large = mean_estimate([rng.random(2000) < 0.5])
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_curve_statistic_and_aligned_arrays():
    x = np.arange(12.0).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    est = bootstrap([(x, y)], lambda a, b: a[b == 1].mean(axis=0) if (b == 1).any() else np.full(2, np.nan))
    np.testing.assert_allclose(est.value, [6.0, 7.0])
    assert est.low.shape == (2,) and np.all(est.low <= est.value) and np.all(est.value <= est.high)


def test_undefined_replicates_are_skipped_not_propagated():
    # one seed where the statistic is always undefined: the estimate comes from the other seed only
    est = bootstrap([np.zeros(5), np.ones(5)], lambda a: np.nan if a.sum() == 0 else a.mean())
    assert est.value == 1.0 and est.low == 1.0


def test_paired_difference_is_paired():
    rng = np.random.default_rng(3)
    base = rng.random(300)
    a, b = base + 0.01, base  # a tiny but perfectly consistent improvement
    est = paired_difference([a], [b])
    assert est.value == pytest.approx(0.01) and est.above(0.0)
    unpaired = mean_estimate([a]).low - mean_estimate([b]).high
    assert unpaired < 0  # unpaired intervals overlap; the paired one does not


def test_format_and_scale():
    est = Estimate(0.625, 0.51, 0.739, 16, 3, np.array([0.6, 0.62, 0.655]))
    assert f"{est.scaled(100):.1f}" == "62.5 [51.0, 73.9]"
    assert est.above(0.5) and not est.below(0.7)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap([])
    with pytest.raises(ValueError, match="share axis 0"):
        bootstrap([(np.zeros(3), np.zeros(4))], lambda a, b: 0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([np.zeros(3)], [np.zeros(4)])


def test_weighted_bootstrap_matches_the_resampling_bootstrap_for_a_mean():
    from helpers.core.stats import bootstrap_weighted

    rng = np.random.default_rng(3)
    per_seed = [rng.random(50), rng.random(40)]
    plain = mean_estimate(per_seed, n_boot=2000)
    weighted = bootstrap_weighted(per_seed, lambda x, weights: weights @ x / weights.sum(1), n_boot=2000)
    assert weighted.value == pytest.approx(plain.value)
    assert weighted.low == pytest.approx(plain.low, abs=0.01) and weighted.high == pytest.approx(plain.high, abs=0.01)
    assert weighted.n == plain.n


def test_weighted_bootstrap_then_is_applied_to_the_seed_mean():
    from helpers.core.stats import bootstrap_weighted

    per_seed = [np.array([[1.0, 3.0]] * 4), np.array([[3.0, 5.0]] * 4)]
    est = bootstrap_weighted(per_seed, lambda x, weights: weights @ x / weights.sum(1, keepdims=True),
                             then=lambda v: v / v.sum())
    np.testing.assert_allclose(est.value, [2 / 6, 4 / 6])
    np.testing.assert_allclose(est.seed_values, [[0.25, 0.75], [3 / 8, 5 / 8]])


def test_hierarchical_bootstrap_includes_the_demonstration_draw():
    """Seeds that disagree (a demonstration effect) widen the hierarchical interval, not the within-seed one."""
    from helpers.core.stats import bootstrap, bootstrap_weighted, mean_estimate

    rng = np.random.default_rng(0)
    per_seed = [rng.normal(mu, 0.1, 200) for mu in (0.0, 1.0, 2.0)]
    within = mean_estimate(per_seed, seeds=False)
    both = mean_estimate(per_seed, seeds=True)
    assert within.value == both.value == pytest.approx(np.mean([a.mean() for a in per_seed]))
    assert within.high - within.low < 0.05
    assert both.high - both.low > 1.0  # three seed means 0, 1, 2: the mean over seeds is uncertain by about ±0.6
    assert both.hierarchical and not within.hierarchical
    assert within.low <= within.weak_low <= within.value <= within.weak_high <= within.high
    one = mean_estimate(per_seed[:1], seeds=True)  # one seed: nothing to resample between seeds
    assert not one.hierarchical and one.high - one.low < 0.05

    def stat(a, weights):
        return (weights * a[None]).sum(1) / weights.sum(1)

    w_within = bootstrap_weighted(per_seed, stat, seeds=False)
    w_both = bootstrap_weighted(per_seed, stat, seeds=True)
    assert w_within.high - w_within.low < 0.05 and w_both.high - w_both.low > 1.0
    b = bootstrap(per_seed, np.mean, seeds=True)
    assert abs((b.high - b.low) - (both.high - both.low)) < 0.3


def test_scaling_keeps_the_weak_interval():
    from helpers.core.stats import mean_estimate

    e = mean_estimate([np.arange(10.0), np.arange(10.0) + 1]).scaled(-2)
    assert e.low <= e.weak_low <= e.weak_high <= e.high


def test_pooled_tasks_keep_their_own_seeds():
    """Two tasks with very different levels: drawing seeds across tasks would mix them; within blocks it does not."""
    from helpers.core.stats import mean_estimate, pooled_over

    rng = np.random.default_rng(1)
    items = [rng.normal(0, 0.01, 50) for _ in range(3)] + [rng.normal(10, 0.01, 50) for _ in range(3)]
    mixed = mean_estimate(items, seeds=True)
    with pooled_over(2):
        kept = mean_estimate(items, seeds=True)
    assert kept.high - kept.low < 0.05 < mixed.high - mixed.low
    with pooled_over(2):  # one seed per task: the tasks are not drawn as if they were seeds
        one = mean_estimate([items[0], items[3]], seeds=True)
    assert one.high - one.low < 0.05
