"""Paired effects and seed replicates (sweeps.effects), and how the report shows intervals: on
hand-built trials, and on score tables stored in a real MLflow store and read back."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from evaluation.intervals import hierarchical_interval, holm, percentile_interval
from evaluation.score_rows import ScoreRows, read_rows, unit_scores
from sweeps.effects import TrialScores, forest_figure, paired_effects, replicate_scores
from sweeps.run_params import factors_of
from sweeps.report import cell, grids_label, render_effects, summary_csv, sweep_analysis, sweep_runs
from sweeps.tracking import ensure_experiment, start_sweep_run


def _trial(name, units, **factors):
    factors = {"backbone": "sup", "loss": "ce", "head": "linear", "seed": "0"} | factors
    return TrialScores(name, factors, {score: (np.asarray(ids), np.asarray(values, dtype=float)) for score, (ids, values) in units.items()})


def _by_key(effects):
    return {(e.factor, e.level, e.backbone, e.score): e for e in effects}


def test_factors_of_a_runs_params():
    params = {"backbone.name": "tiny", "probe.head.type": "bcos", "probe.head.depth": "2", "probe.head.width": "256",
              "probe.loss": "bce", "probe.seed": "1", "evaluate.smoothing": "none", "train.lr": "0.03"}  # fmt: skip
    assert factors_of(params) == {"head": "bcos-d2-w256", "backbone": "tiny", "loss": "bce", "seed": "1", "smoothing": "none", "train.lr": "0.03"}


def test_a_paired_effect_is_the_mean_per_shared_grid_over_pairs():
    score = "gridpg/ixg/input"
    rng = np.random.default_rng(3)
    ce0, ce1, bce0, bce1 = (rng.uniform(0, 1, 10) for _ in range(4))
    trials = [
        _trial("a", {score: (range(10), ce0)}),
        _trial("b", {score: (range(2, 10), bce0[2:])}, loss="bce"),  # confident on grids 2..9 only
        _trial("c", {score: (range(10), ce1)}, seed="1"),
        _trial("d", {score: (range(10), bce1)}, loss="bce", seed="1"),
    ]
    (effect,) = paired_effects(trials)
    # by hand: grids 0, 1 only in the seed-1 pair; grids 2..9 averaged over both seeds' pairs
    per_grid = np.concatenate([(bce1 - ce1)[:2], ((bce0 - ce0)[2:] + (bce1 - ce1)[2:]) / 2])
    assert (effect.factor, effect.level, effect.baseline, effect.backbone) == ("loss", "bce", "ce", "sup")
    assert effect.mean == pytest.approx(per_grid.mean(), abs=1e-12)
    assert (effect.low, effect.high) == pytest.approx(tuple(map(float, percentile_interval(per_grid))), abs=1e-12)
    assert (effect.units, effect.pairs) == (10, 2)
    assert effect.p_holm == effect.p  # one test: Holm changes nothing


def test_a_probe_against_itself_has_no_effect_and_no_mark():
    values = np.random.default_rng(0).uniform(0, 1, 12)
    trials = [_trial("a", {"epg/ixg/input": (range(12), values)}), _trial("b", {"epg/ixg/input": (range(12), values)}, loss="bce")]
    (effect,) = paired_effects(trials)
    assert (effect.mean, effect.low, effect.high) == (0.0, 0.0, 0.0)
    assert effect.p == 1.0 and not effect.significant


def test_effects_are_per_backbone_and_holm_adjusted_together():
    score = "gridpg/ixg/input"
    rng = np.random.default_rng(1)
    base = {b: rng.uniform(0.2, 0.4, 40) for b in ("sup", "ssl")}
    trials = [
        _trial(f"{b}-{loss}", {score: (range(40), base[b] + (0.3 if loss == "bce" and b == "sup" else 0) + rng.normal(0, 0.01, 40))},
               backbone=b, loss=loss)
        for b in ("sup", "ssl") for loss in ("ce", "bce")
    ]  # fmt: skip
    effects = _by_key(paired_effects(trials))
    assert set(effects) == {("loss", "bce", "sup", score), ("loss", "bce", "ssl", score), ("backbone", "ssl", "all", score)}
    assert effects[("loss", "bce", "sup", score)].significant and effects[("loss", "bce", "sup", score)].mean == pytest.approx(0.3, abs=0.01)
    assert not effects[("loss", "bce", "ssl", score)].significant
    ps = [e.p for e in effects.values()]
    assert [e.p_holm for e in effects.values()] == pytest.approx(list(holm(ps)))


def test_configurations_that_never_pair_give_no_effect():
    score = "gridpg/ixg/input"
    trials = [_trial("a", {score: (range(4), [0.1] * 4)}, **{"train.lr": "0.1"}), _trial("b", {score: (range(4), [0.2] * 4)}, loss="bce", **{"train.lr": "0.2"})]
    assert paired_effects(trials) == []


def test_replicates_are_grouped_with_a_hierarchical_interval():
    score = "gridpg/ixg/input"
    rng = np.random.default_rng(2)
    seeds = [rng.uniform(0, 1, 8) for _ in range(3)]
    trials = [_trial(f"s{s}", {score: (range(8), v)}, seed=str(s)) for s, v in enumerate(seeds)] + [_trial("alone", {score: (range(8), seeds[0])}, loss="bce")]
    (row,) = replicate_scores(trials)
    assert (row["loss"], row["seeds"], row["seed"]) == ("ce", 3, "0, 1, 2")
    assert row[score] == hierarchical_interval(seeds)
    assert row[score][0] == pytest.approx(np.mean([v.mean() for v in seeds]))


def test_forest_figure_shows_one_line_per_effect():
    score = "gridpg/ixg/input"
    trials = [_trial("a", {score: (range(6), np.linspace(0, 1, 6))}), _trial("b", {score: (range(6), np.linspace(0, 1, 6) ** 2)}, loss="bce")]
    effects = paired_effects(trials)
    figure = forest_figure(effects)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [f"loss bce - ce | sup | {score}"]


def test_results_table_cells_show_the_interval_and_top1_grids():
    assert cell(0.3184, (0.2712, 0.3633)) == "0.318 [0.27, 0.36]"
    assert cell(0.3184) == "0.318" and cell(0.3184, (float("nan"), float("nan"))) == "0.318"
    assert grids_label({"grids/count": 12.0, "grids/threshold": 0.0}) == "12 top-1"
    assert grids_label({"grids/count": 12.0, "grids/threshold": 0.8}) == 12 and grids_label({}) is None
    rows = [{"trial": "t0", "gridpg/ixg/input": 0.5, "_ci": {"gridpg/ixg/input": (0.4, 0.6)}, "_run_id": "r"}]
    table = list(csv.DictReader(io.StringIO(summary_csv(rows))))
    assert table[0]["gridpg/ixg/input/ci_low"] == "0.4" and table[0]["gridpg/ixg/input/ci_high"] == "0.6" and table[0]["run_id"] == "r"
    rows[0]["gridpg/ixg/input/ci_low"] = 0.4  # an objective that is a bound: one column
    header = summary_csv(rows).splitlines()[0].split(",")
    assert header.count("gridpg/ixg/input/ci_low") == 1


def _store_trial(uri, experiment_id, parent, name, params, grids, scores, folder):
    """A finished child run holding ``scores/gridpg.csv.gz`` as a trial writes it."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent, "trial_id": name})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    rows = ScoreRows()
    cells = torch.arange(4).repeat(len(grids))
    rows.add(("gridpg", "ixg", "input"), {
        "grid": torch.tensor(grids).repeat_interleave(4), "cell": cells, "class": cells, "image": cells,
        "confidence": torch.full((4 * len(grids),), 0.9), "score": torch.tensor(scores, dtype=torch.float64).repeat_interleave(4) + 0.01 * cells,
    })  # fmt: skip
    (table,) = rows.write(folder / name)
    client.log_artifact(run.info.run_id, str(table), "scores")
    client.set_terminated(run.info.run_id)


def test_report_effects_equal_a_hand_computation_from_the_stored_rows(tmp_path, capfd, sqlite_store):
    uri = sqlite_store
    experiment_id = ensure_experiment(uri, "effects")
    shared = {"backbone.name": "tiny_resnet_sup", "probe.head.type": "linear", "probe.seed": "0"}  # on the parent only
    parent = start_sweep_run(uri, experiment_id, "effects-1", "name: effects\n", n_trials=2, shared=shared)
    _store_trial(uri, experiment_id, parent, "t0", {"probe.loss": "ce"}, [0, 1, 2, 3, 5], [0.2, 0.3, 0.4, 0.5, 0.6], tmp_path)
    _store_trial(uri, experiment_id, parent, "t1", {"probe.loss": "bce"}, [1, 2, 3, 4, 5], [0.5, 0.5, 0.6, 0.9, 0.9], tmp_path)
    analysis = sweep_analysis(uri, parent)
    (effect,) = analysis.effects
    assert "Downloading" not in capfd.readouterr().err  # no progress bar per file
    assert analysis.replicates == [] and analysis.agreement == []  # one method and layer: nothing to agree with
    # by hand from the stored tables: grid means on the grids both probes scored (1, 2, 3, 5)
    downloaded = {}
    client = MlflowClient(uri)
    for run in sweep_runs(uri, parent):
        path = client.download_artifacts(run.info.run_id, "scores/gridpg.csv.gz", str(tmp_path / run.info.run_name))
        downloaded[run.data.params["probe.loss"]] = dict(zip(*unit_scores(read_rows(Path(path))[("ixg", "input")])))
    shared = sorted(set(downloaded["ce"]) & set(downloaded["bce"]))
    by_hand = np.array([downloaded["bce"][g] - downloaded["ce"][g] for g in shared])
    assert shared == [1, 2, 3, 5] and effect.units == 4
    assert effect.mean == pytest.approx(by_hand.mean(), abs=1e-9) == pytest.approx(np.mean([0.2, 0.1, 0.1, 0.3]))
    table = render_effects([effect])
    assert list(table.columns[0].cells) == ["loss bce - ce"] and list(table.columns[3].cells) == [f"{effect.mean:+.3f}  "]


def test_effects_list_the_probes_factors_first_and_the_backbone_last():
    score = "gridpg/ixg/input"
    trials = [
        _trial(f"{b}-{loss}-{head}", {score: (range(4), np.arange(4) / 8 + 0.1 * (loss == "bce") + 0.2 * (head == "mlp"))}, backbone=b, loss=loss, head=head)
        for b in ("sup", "ssl") for head in ("linear", "mlp") for loss in ("ce", "bce")
    ]  # fmt: skip
    effects = paired_effects(trials)
    assert [(e.factor, e.backbone) for e in effects] == [("loss", "ssl"), ("loss", "sup"), ("head", "ssl"), ("head", "sup"), ("backbone", "all")]
    assert [e.mean for e in effects[:4]] == pytest.approx([0.1, 0.1, 0.2, 0.2])


def test_the_pareto_figure_draws_each_scores_interval_as_a_whisker():
    from sweeps.report import pareto_figure

    rows = [
        {"trial": "a", "status": "FINISHED", "val/accuracy": 0.9, "gridpg/ixg/input": 0.3, "_ci": {"gridpg/ixg/input": (0.25, 0.35)}},
        {"trial": "b", "status": "FINISHED", "val/accuracy": 0.8, "gridpg/ixg/input": 0.5, "_ci": {"gridpg/ixg/input": (0.42, 0.58)}},
    ]
    figure = pareto_figure(rows, {"val/accuracy": "max", "gridpg/ixg/input": "max"})
    segments = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in figure.axes[0].get_lines()}
    assert ((0.9, 0.9), (0.25, 0.35)) in segments and ((0.8, 0.8), (0.42, 0.58)) in segments


def test_the_pareto_figure_labels_each_probe_and_its_legend_names_colours_and_shapes():
    from sweeps.report import pareto_figure

    rows = [
        {"trial": "a", "_name": "ce-linear", "loss": "ce", "head": "linear", "status": "FINISHED", "val/accuracy": 0.9, "gridpg/ixg/input": 0.3},
        {"trial": "b", "_name": "bce-linear", "loss": "bce", "head": "linear", "status": "FINISHED", "val/accuracy": 0.8, "gridpg/ixg/input": 0.5},
        {"trial": "c", "_name": "bce-bcos", "loss": "bce", "head": "bcos-d2", "status": "FINISHED", "val/accuracy": 0.7, "gridpg/ixg/input": 0.4},
        {"trial": "d", "_name": "failed", "loss": "ce", "head": "bcos-d2", "status": "FAILED", "val/accuracy": 0.99, "gridpg/ixg/input": 0.9},
    ]  # fmt: skip
    figure = pareto_figure(rows, {"val/accuracy": "max", "gridpg/ixg/input": "max"}, "sweep x")
    axes = figure.axes[0]
    assert sorted(t.get_text() for t in axes.texts) == ["bce-bcos", "bce-linear", "ce-linear"]  # finished trials only
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == ["loss ce", "loss bce", "head linear", "head bcos-d2", "Pareto front"]
    front_line = [line for line in axes.get_lines() if line.get_color() == "tab:red"]
    assert len(front_line) == 1 and list(front_line[0].get_xdata()) == [0.8, 0.9]  # c is dominated by b
    assert axes.get_title() == "sweep x" and axes.get_xlabel() == "val/accuracy (max)"
