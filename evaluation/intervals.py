"""Uncertainty of localisation scores: bootstrap intervals over a score's rows (grids, or EPG's
(image, class) rows), paired differences between probes, seeds then rows (hierarchical), and
Holm's adjustment for the many effects a sweep report shows. Pure functions of NumPy arrays.

Every interval is the percentile bootstrap (Efron): resample the rows with replacement
``n_resamples`` times, take the mean of each resample, and report the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles of those means. All columns of a table share the same resamples,
drawn as one (resamples x rows) matrix of counts, so that a table of 36 scores costs one matrix
product; a paired difference resamples the rows both probes scored, together.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "LEVEL", "RESAMPLES", "bootstrap_means", "bootstrap_pvalues", "holm", "hierarchical_interval",
    "paired_difference", "percentile_interval", "resample_counts",
]

RESAMPLES = 2000  # per interval; the Monte Carlo error of a 95% bound is then well under 0.005 for scores in [0, 1]
LEVEL = 0.95


def resample_counts(n_rows: int, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(n_resamples, n_rows) float: how often each row is drawn in each resample (each row sums to n_rows)."""
    if n_rows < 1:
        raise ValueError("a bootstrap needs at least one row")
    draws = np.random.default_rng(seed).integers(0, n_rows, size=(n_resamples, n_rows))
    offsets = np.arange(n_resamples)[:, None] * n_rows
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_rows).reshape(n_resamples, n_rows).astype(float)


def bootstrap_means(values: np.ndarray, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of resampled rows: values (n,) -> (n_resamples,), or (n, m) -> (n_resamples, m), every
    column resampled with the same rows."""
    values = np.asarray(values, dtype=float)
    counts = resample_counts(len(values), n_resamples, seed)
    return counts @ values / len(values)


def _quantiles(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return low, high


def percentile_interval(
    values: np.ndarray, level: float = LEVEL, n_resamples: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the percentile bootstrap interval of the mean of each column of ``values``
    ((n,) -> floats, (n, m) -> (m,) arrays). NaN for no rows; one row gives a zero-width interval."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan
    return _quantiles(bootstrap_means(values, n_resamples, seed), level)


def paired_difference(
    a: np.ndarray, b: np.ndarray, level: float = LEVEL, n_resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)`` for two probes' scores on the same rows (row i of ``a`` and of
    ``b`` score the same grid cell or (image, class)). A probe against itself gives exactly (0, 0, 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two (n,) arrays of the same rows, got {a.shape} and {b.shape}")
    difference = a - b
    low, high = percentile_interval(difference, level, n_resamples, seed)
    return float(difference.mean()) if len(difference) else float("nan"), float(low), float(high)


def hierarchical_interval(
    groups: Sequence[np.ndarray], level: float = LEVEL, n_resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` over seed replicates: ``groups[s]`` holds replicate s's row scores.
    Each resample draws replicates with replacement, then rows within each drawn replicate; its
    statistic is the mean of the drawn replicates' means. The point estimate is the mean of the
    replicates' means."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    rng, slots = np.random.default_rng(seed), len(groups)
    chosen = rng.integers(0, slots, size=(n_resamples, slots))  # the replicates each resample draws
    # (groups, n_resamples, slots): a fresh row resample of every replicate for every slot, so
    # that a replicate drawn twice in one resample is resampled twice, independently
    inner = np.stack([
        bootstrap_means(g, n_resamples * slots, int(rng.integers(2**32))).reshape(n_resamples, slots) for g in groups
    ])  # fmt: skip
    means = inner[chosen, np.arange(n_resamples)[:, None], np.arange(slots)[None, :]].mean(axis=1)
    low, high = _quantiles(means, level)
    return float(np.mean([g.mean() for g in groups])), float(low), float(high)


def bootstrap_pvalues(differences: np.ndarray, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Two-sided p-value of "the mean difference is 0" for each column of ``differences`` ((n,) or
    (n, m): paired differences of two probes' row scores), by the studentized (bootstrap-t)
    bootstrap: the share of resamples whose t statistic around the observed mean is at least as
    far from 0 as the observed one, ``(count + 1) / (n_resamples + 1)``. Its tails hold their level
    where the percentile bootstrap's are too thin (with no effect, Holm over 6 tests of 64 rows
    marked 8% of simulated sweeps with percentile p-values, 5% with these). No spread gives 1 for a
    zero mean and 0 otherwise."""
    d = np.asarray(differences, dtype=float)
    column = d.ndim == 1
    d = d[:, None] if column else d
    n = len(d)
    if n < 2:
        return np.full(d.shape[1], np.nan)[0 if column else slice(None)]
    counts = resample_counts(n, n_resamples, seed)
    mean, spread = d.mean(axis=0), d.std(axis=0, ddof=1) / np.sqrt(n)
    means = counts @ d / n
    spreads = np.sqrt(np.maximum(counts @ d**2 / n - means**2, 0) / (n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = np.abs(mean / spread)
        resampled = np.abs((means - mean) / spreads)
    p = ((resampled >= observed).sum(axis=0) + 1) / (n_resamples + 1)
    p = np.where(spread > 0, p, np.where(mean == 0, 1.0, 0.0))
    return p[0] if column else p


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone): an effect is significant at level
    alpha when its adjusted p-value is below alpha, which keeps the chance of any false mark at or
    below alpha over all the effects tested together."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted
