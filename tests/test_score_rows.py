"""A trial's per-row scores: units for the bootstrap, intervals per score, and the stored table."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from evaluation.intervals import percentile_interval
from evaluation.score_rows import ScoreRows, headline_rows, read_rows, unit_scores


def _grid_columns(scores, grids=(4, 4, 9, 9), cells=(0, 3, 0, 3)):
    n = len(scores)
    return {
        "grid": torch.tensor(grids[:n]), "cell": torch.tensor(cells[:n]), "class": torch.arange(n),
        "image": torch.arange(n) + 10, "confidence": torch.full((n,), 0.9), "score": torch.tensor(scores),
    }  # fmt: skip


def test_a_grid_is_one_unit_scored_by_the_mean_of_its_cells_and_an_epg_row_is_its_own():
    ids, values = unit_scores({k: v.numpy() for k, v in _grid_columns([0.2, 0.4, 1.0, 0.0]).items()})
    assert ids.tolist() == [4, 9] and values.tolist() == pytest.approx([0.3, 0.5])
    epg = {"image": np.array([1, 1, 2]), "class": np.array([3, 5, 3]), "score": np.array([0.1, 0.2, 0.3])}
    ids, values = unit_scores(epg)
    assert ids.tolist() == [1_000_003, 1_000_005, 2_000_003] and values.tolist() == [0.1, 0.2, 0.3]


def test_each_score_gets_the_bootstrap_interval_of_its_units_and_the_table_reads_back(tmp_path):
    rows = ScoreRows()
    rows.add(("gridpg", "ixg", "input"), _grid_columns([0.2, 0.4, 1.0, 0.0]))
    rows.add(("gridpg", "gradcam", "final"), _grid_columns([0.9, 0.7, 0.6, 0.6]))
    epg = {"image": torch.tensor([1, 1, 2]), "class": torch.tensor([3, 5, 3]), "confidence": torch.tensor([0.5, 0.25, 0.75]), "score": torch.tensor([0.1, 0.2, 0.3])}
    rows.add(("epg", "ixg", "input"), epg)
    intervals = rows.intervals(seed=3)
    low, high = percentile_interval(np.stack([[0.3, 0.5], [0.8, 0.6]], axis=1), seed=3)
    assert intervals["gridpg/ixg/input/ci_low"] == pytest.approx(low[0]) and intervals["gridpg/gradcam/final/ci_high"] == pytest.approx(high[1])
    low, high = percentile_interval(np.array([0.1, 0.2, 0.3]), seed=3)
    assert (intervals["epg/ixg/input/ci_low"], intervals["epg/ixg/input/ci_high"]) == pytest.approx((low, high))
    assert len(intervals) == 6
    files = rows.write(tmp_path / "scores")
    assert [f.name for f in files] == ["gridpg.csv.gz", "epg.csv.gz"]
    back = read_rows(tmp_path / "scores" / "gridpg.csv.gz")
    assert set(back) == {("ixg", "input"), ("gradcam", "final")}
    for name, values in _grid_columns([0.2, 0.4, 1.0, 0.0]).items():
        assert back[("ixg", "input")][name] == pytest.approx(values.numpy(), rel=1e-6)
    epg_back = read_rows(tmp_path / "scores" / "epg.csv.gz")[("ixg", "input")]
    assert epg_back["headline"].tolist() == [1, 1, 1]  # every EPG row counts
    assert epg_back["grid"].tolist() == [-1, -1, -1] and epg_back["confidence"].tolist() == [0.5, 0.25, 0.75]
    assert unit_scores(epg_back)[1] == pytest.approx([0.1, 0.2, 0.3])
    (tmp_path / "other.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    with pytest.raises(ValueError, match="other.csv.gz: not a score table"):
        read_rows(tmp_path / "other.csv.gz")


def test_intervals_are_over_the_headline_grids_and_every_scored_grid_is_stored(tmp_path):
    rows = ScoreRows()
    columns = _grid_columns([0.2, 0.4, 1.0, 0.0]) | {"headline": torch.tensor([False, False, True, True])}
    rows.add(("gridpg", "ixg", "input"), columns)
    intervals = rows.intervals()
    assert intervals["gridpg/ixg/input/ci_low"] == intervals["gridpg/ixg/input/ci_high"] == pytest.approx(0.5)  # grid 9 alone
    (table,) = rows.write(tmp_path)
    back = read_rows(table)[("ixg", "input")]
    assert back["headline"].tolist() == [0, 0, 1, 1] and back["grid"].tolist() == [4, 4, 9, 9]
    assert unit_scores(headline_rows(back))[0].tolist() == [9] and unit_scores(back)[0].tolist() == [4, 9]
