"""Bootstrap intervals, paired differences, seed replicates and Holm's adjustment
(``evaluation.intervals``): against scipy, hand-computed cases and simulated scores with a planted
effect."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from evaluation.intervals import (
    bootstrap_means,
    bootstrap_pvalues,
    hierarchical_interval,
    holm,
    paired_difference,
    percentile_interval,
    resample_counts,
)


@pytest.mark.parametrize("shape", [(16,), (64,), (500, 36), (16, 3)])
def test_the_interval_equals_scipys_percentile_bootstrap_on_the_same_resamples(shape):
    """scipy draws its resamples as ``integers(0, n, (n_resamples, n))`` from the generator it is
    given, as ours does: with the same seed both see the same resamples and agree to rounding."""
    values = np.random.default_rng(3).beta(2, 3, size=shape)  # scores in [0, 1], as localisation scores are
    low, high = percentile_interval(values, seed=1)
    theirs = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method="percentile", axis=0, random_state=np.random.default_rng(1)
    ).confidence_interval
    assert np.abs(low - theirs.low).max() < 1e-12 and np.abs(high - theirs.high).max() < 1e-12
    assert np.all(low < values.mean(axis=0)) and np.all(values.mean(axis=0) < high)


def test_on_other_resamples_the_interval_moves_by_less_than_0_005():
    values = np.random.default_rng(3).beta(2, 3, size=(500, 36))
    low, high = percentile_interval(values, seed=1)
    theirs = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=2000, method="percentile", axis=0, random_state=np.random.default_rng(2)
    ).confidence_interval
    assert np.abs(low - theirs.low).max() < 0.005 and np.abs(high - theirs.high).max() < 0.005


def test_every_resample_draws_as_many_rows_as_there_are_and_columns_share_them():
    counts = resample_counts(7, n_resamples=50, seed=0)
    assert counts.shape == (50, 7) and np.all(counts.sum(axis=1) == 7) and np.all(counts >= 0)
    assert np.array_equal(resample_counts(7, 50, seed=0), counts) and not np.array_equal(resample_counts(7, 50, seed=1), counts)
    values = np.random.default_rng(0).random((7, 2))
    both = bootstrap_means(values, 50, seed=0)
    assert np.allclose(both[:, 1], bootstrap_means(values[:, 1], 50, seed=0))
    assert np.allclose(both, counts @ values / 7)


def test_a_probe_against_itself_differs_by_exactly_zero():
    scores = np.random.default_rng(0).random(40)
    assert paired_difference(scores, scores) == (0.0, 0.0, 0.0)


def test_one_row_gives_a_zero_width_interval_and_no_rows_none():
    assert percentile_interval(np.array([0.3])) == (pytest.approx(0.3), pytest.approx(0.3))
    low, high = percentile_interval(np.zeros((0, 3)))
    assert np.isnan(low).all() and np.isnan(high).all()
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(np.zeros(3), np.zeros(4))


def _paired_scores(rng, rows: int, effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Two probes on the same grids: a grid's difficulty is shared, each probe adds its own noise."""
    grid = rng.beta(2, 2, size=rows)
    a = np.clip(grid + effect + rng.normal(0, 0.1, rows), 0, 1)
    b = np.clip(grid + rng.normal(0, 0.1, rows), 0, 1)
    return a, b


def test_the_interval_of_a_planted_effect_covers_it_90_to_99_percent_of_the_time():
    rng, truth, covered = np.random.default_rng(7), 0.05, 0
    # the true effect after clipping, from a large sample of the same process
    a, b = _paired_scores(np.random.default_rng(99), 2_000_000, truth)
    truth = float((a - b).mean())
    for repetition in range(200):
        a, b = _paired_scores(rng, 64, 0.05)
        _, low, high = paired_difference(a, b, seed=repetition)
        covered += low <= truth <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_with_no_effect_holm_marks_an_effect_in_at_most_5_percent_of_repetitions():
    rng, marked = np.random.default_rng(11), 0
    for repetition in range(200):
        differences = []
        for _ in range(6):  # six factors x methods, none with an effect
            a, b = _paired_scores(rng, 64, 0.0)
            differences.append(a - b)
        marked += bool((holm(bootstrap_pvalues(np.stack(differences, axis=1), seed=repetition)) < 0.05).any())
    assert marked / 200 <= 0.05


def test_holm_adjusts_as_computed_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert bootstrap_pvalues(np.zeros(5)) == 1.0 and bootstrap_pvalues(np.full(5, 0.1)) == 0.0


def test_the_studentized_p_value_is_near_the_t_tests_and_falls_with_the_effect():
    rng = np.random.default_rng(4)
    rows = np.stack([np.subtract(*_paired_scores(rng, 64, effect)) for effect in (0.0, 0.01, 0.03, 0.1)], axis=1)
    ours = bootstrap_pvalues(rows, n_resamples=10_000)
    theirs = scipy.stats.ttest_1samp(rows, 0.0).pvalue
    assert np.all(np.abs(ours - theirs) < 0.02 + 0.2 * theirs)
    assert ours[-1] < 1e-3 and np.all(np.diff(ours[1:]) < 0)


def test_seed_replicates_resample_seeds_then_rows():
    rng = np.random.default_rng(5)
    same = [np.full(20, 0.4)] * 3
    assert hierarchical_interval(same) == pytest.approx((0.4, 0.4, 0.4))
    # three seeds whose means differ: the interval is wider than pooling their rows as one sample
    groups = [rng.normal(centre, 0.05, 50) for centre in (0.3, 0.4, 0.5)]
    mean, low, high = hierarchical_interval(groups)
    pooled_low, pooled_high = percentile_interval(np.concatenate(groups))
    assert mean == pytest.approx(np.mean([g.mean() for g in groups]))
    assert high - low > 3 * (pooled_high - pooled_low)
    assert 0.25 < low < mean < high < 0.55
    assert hierarchical_interval([np.array([0.2, 0.4])]) == hierarchical_interval([np.array([0.2, 0.4])])
