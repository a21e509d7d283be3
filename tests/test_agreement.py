"""Agreement of methods, layers and smoothing kernels (Spearman's rho over shared units), on
hand-built trials: against scipy and hand computations; the report's table and heat map."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from sweeps.agreement import agreement_csv, agreement_figure, method_agreement, spearman
from sweeps.effects import TrialScores
from sweeps.report import SweepAnalysis, analysis_files, render_agreement


def _trial(name, units, **factors):
    factors = {"backbone": "sup", "loss": "ce", "head": "linear", "seed": "0"} | factors
    return TrialScores(name, factors, {score: (np.asarray(ids), np.asarray(values, dtype=float)) for score, (ids, values) in units.items()})


def test_spearman_equals_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))  # a constant column ranks nothing


def test_agreement_is_the_mean_over_probes_of_rho_on_the_units_both_columns_hold():
    rng = np.random.default_rng(1)
    a0, b0, c0, a1, b1 = (rng.uniform(size=12) for _ in range(5))
    ids = np.arange(12)
    trials = [
        _trial("t0", {"gridpg/ixg/input": (ids, a0), "gridpg/gradcam/final": (ids, b0), "epg/ixg/input": (ids, c0)}, loss="ce"),
        # the second probe scored grids 2..11 with gradcam, 0..11 with ixg
        _trial("t1", {"gridpg/ixg/input": (ids, a1), "gridpg/gradcam/final": (ids[2:], b1[2:])}, loss="bce"),
    ]
    (row,) = method_agreement(trials)  # epg has one column: no pair
    by_hand = np.mean([spearmanr(a0, b0).statistic, spearmanr(a1[2:], b1[2:]).statistic])
    assert (row.metric, row.a, row.b, row.probes, row.units) == ("gridpg", "ixg/input", "gradcam/final", 2, 22)
    assert row.rho == pytest.approx(by_hand, abs=1e-12)
    assert agreement_csv([row]).splitlines() == ["metric,a,b,spearman,probes,units", f"gridpg,ixg/input,gradcam/final,{row.rho:.6g},2,22"]


def test_kernels_of_the_same_probe_are_compared_and_other_probes_are_not():
    rng = np.random.default_rng(2)
    ids = np.arange(10)
    raw, smoothed, other = rng.uniform(size=10), rng.uniform(size=10), rng.uniform(size=10)
    trials = [
        _trial("t0", {"gridpg/ixg/input": (ids, raw)}, smoothing="none"),
        _trial("t1", {"gridpg/ixg/input": (ids, smoothed)}, smoothing="reference"),
        _trial("t2", {"gridpg/ixg/input": (ids, other)}, smoothing="none", loss="bce"),  # another probe, alone
    ]
    (row,) = method_agreement(trials)
    assert (row.a, row.b, row.probes) == ("ixg/input @ smoothing none", "ixg/input @ smoothing reference", 1)
    assert row.rho == pytest.approx(spearmanr(raw, smoothed).statistic, abs=1e-12)


def test_identical_rankings_agree_fully_and_too_few_shared_units_say_nothing():
    ids = np.arange(6)
    values = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4])
    trials = [_trial("t0", {"gridpg/ixg/input": (ids, values), "gridpg/ixg/final": (ids, values**2), "gridpg/grad/input": (ids[:2], values[:2])})]
    (row,) = method_agreement(trials)
    assert (row.a, row.b, row.rho) == ("ixg/input", "ixg/final", pytest.approx(1.0))


def test_the_heat_map_and_the_table_show_each_pair_once_and_symmetric():
    rng = np.random.default_rng(3)
    ids = np.arange(15)
    columns = {f"gridpg/{m}": (ids, rng.uniform(size=15)) for m in ("ixg/input", "ixg/final", "gradcam/final")}
    rows = method_agreement([_trial("t0", columns)])
    assert len(rows) == 3
    figure = agreement_figure(rows, "gridpg")
    matrix = figure.axes[0].images[0].get_array()
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == ["ixg/input", "ixg/final", "gradcam/final"]
    for r in rows:
        i, j = labels.index(r.a), labels.index(r.b)
        assert matrix[i, j] == matrix[j, i] == pytest.approx(r.rho)
    assert np.allclose(np.diag(matrix), 1.0)
    table = render_agreement(rows, "gridpg")
    assert [c.header for c in table.columns] == ["", *labels]
    assert list(table.columns[1].cells) == ["1", f"{rows[0].rho:+.2f}", f"{rows[1].rho:+.2f}"]
    files = analysis_files(SweepAnalysis(agreement=rows))
    assert set(files) == {"agreement.csv", "agreement-gridpg.png"}
    import matplotlib.pyplot as plt

    plt.close(figure)
    plt.close(files["agreement-gridpg.png"])
