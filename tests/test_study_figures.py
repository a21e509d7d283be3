"""Parallel coordinates and parameter importances over what a sweep varied, read back from the
matplotlib objects (not pixels)."""

import matplotlib
import optuna

from sweeps.study_figures import importance_figure, parallel_figure, sweep_study

OBJECTIVES = {"gridpg/ixg/input": "max", "val/accuracy": "max"}


def _rows():
    rows = []
    for i, (backbone, loss, head, lr) in enumerate([(b, l, h, lr) for b in ("sup", "ssl") for l in ("ce", "bce")
                                                    for h in ("linear", "bcos") for lr in ("0.01", "0.1")]):  # fmt: skip
        params = {"backbone.name": backbone, "probe.loss": loss, "probe.head.type": head, "train.lr": lr, "probe.seed": "0"}
        score = 0.3 + 0.3 * (loss == "bce") + 0.01 * (i % 3)
        rows.append({"trial": f"t{i}", "status": "FINISHED", "val/accuracy": 0.9 - 0.01 * (i % 4), "gridpg/ixg/input": score, "_params": params})
    rows.append({"trial": "failed", "status": "FAILED", "val/accuracy": 0.99, "gridpg/ixg/input": 0.99, "_params": {"probe.loss": "mse"}})
    return rows


def test_the_study_holds_the_finished_trials_over_the_varied_factors():
    study = sweep_study(_rows(), OBJECTIVES)
    assert len(study.trials) == 16  # not the failed one
    first = study.trials[0]
    assert set(first.params) == {"backbone", "loss", "head", "train.lr"}  # the seed does not vary
    assert first.distributions["train.lr"] == optuna.distributions.FloatDistribution(0.01, 0.1)
    assert first.distributions["loss"] == optuna.distributions.CategoricalDistribution(["bce", "ce"])
    assert [t.values for t in study.trials[:2]] == [[0.3, 0.9], [0.31, 0.89]]
    assert sweep_study(_rows()[:1], OBJECTIVES) is None  # one trial: nothing to compare


def test_parallel_coordinates_and_importances_name_the_factors_and_objectives_and_leave_the_style_alone():
    style = dict(matplotlib.rcParams)
    verbosity = optuna.logging.get_verbosity()
    parallel = parallel_figure(_rows(), OBJECTIVES)
    ticks = [t.get_text() for t in parallel.axes[0].get_xticklabels()]
    assert ticks == ["gridpg/ixg/input", "backbone", "head", "loss", "train.lr"]
    assert parallel.axes[0].get_title() == "parallel coordinates, coloured by gridpg/ixg/input (max)"
    importance = importance_figure(_rows(), OBJECTIVES)
    axes = importance.axes[0]
    assert sorted(t.get_text() for t in axes.get_yticklabels()) == ["backbone", "head", "loss", "train.lr"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == list(OBJECTIVES)
    # Optuna's plots set the ggplot style for the process; put back, as its log level
    assert dict(matplotlib.rcParams) == style and optuna.logging.get_verbosity() == verbosity
