"""Bootstrap intervals of a sweep's scores: ours (one matrix of resample counts shared by every
column) against ``scipy.stats.bootstrap`` (percentile method), on the same rows and resamples.

    .venv/bin/python bench/bootstrap.py [--rows 500] [--metrics 36] [--resamples 2000] [--repeats 5]

The rows stand for a trial's grids and the columns for its scores (metric x method x layer). The
baseline is scipy called once per score, as a user would for a table of scores; scipy vectorised
over all columns in one call is shown too. Times are the best of ``--repeats``. Last line: ours vs
scipy per score.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.stats

from evaluation.intervals import percentile_interval


def _best(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--metrics", type=int, default=36)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scores = np.random.default_rng(0).beta(2, 3, size=(args.rows, args.metrics))

    def scipy_call(values):
        rng = np.random.default_rng(1)  # the resamples ours draws with seed 1
        ci = scipy.stats.bootstrap((values,), np.mean, n_resamples=args.resamples, method="percentile", axis=0, random_state=rng)
        return ci.confidence_interval.low, ci.confidence_interval.high

    per_score, theirs = _best(lambda: [scipy_call(scores[:, j]) for j in range(args.metrics)], args.repeats)
    vectorised, theirs_all = _best(lambda: scipy_call(scores), args.repeats)
    ours_s, (low, high) = _best(lambda: percentile_interval(scores, n_resamples=args.resamples, seed=1), args.repeats)
    gap = max(np.abs(low - theirs_all[0]).max(), np.abs(high - theirs_all[1]).max())
    gap_single = max(max(abs(low[j] - t[0]), abs(high[j] - t[1])) for j, t in enumerate(theirs))
    print(f"{args.rows} rows x {args.metrics} scores, {args.resamples} resamples, best of {args.repeats}")
    print("| case | seconds | ours vs case | largest bound difference |")
    print("|---|---|---|---|")
    print(f"| scipy, one call per score (baseline) | {per_score:.4f} | {per_score / ours_s:.1f}x | {gap_single:.1e} |")
    print(f"| scipy, one call for all scores | {vectorised:.4f} | {vectorised / ours_s:.1f}x | {gap:.1e} |")
    print(f"| ours, one call for all scores | {ours_s:.4f} | 1.0x | - |")
    print(f"bootstrap intervals, ours vs scipy: {per_score / ours_s:.1f}x")


if __name__ == "__main__":
    main()
