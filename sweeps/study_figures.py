"""Parallel coordinates and parameter importances over what a sweep varied, drawn by Optuna's
matplotlib plots from an in-memory study built from the sweep's finished trials (any search:
grid, random or Optuna). The params are the trials' factors (``loss``, ``head``, ``backbone``,
``train.lr``, ...: see :func:`sweeps.run_params.factors_of`) that take more than one value; a
factor whose values are all numbers is numeric, the others categorical."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Sequence

from sweeps.report import value_of
from sweeps.run_params import factors_of

__all__ = ["importance_figure", "parallel_figure", "sweep_study"]


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


@contextmanager
def _quiet_optuna():
    """Optuna's plots set the ggplot style for the whole process and its study creation logs at
    INFO: both put back as they were on the way out."""
    import matplotlib
    import optuna
    from optuna.exceptions import ExperimentalWarning

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def sweep_study(rows: Sequence[dict[str, object]], objectives: dict[str, str]):
    """An in-memory Optuna study with a trial per finished row that has every objective (its
    values), over the varied factors; None when fewer than two such rows or no factor varies."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    scored = [r for r in rows if str(r["status"]).startswith("FINISHED") and all(value_of(r, m) is not None for m in objectives)]
    factors = [factors_of(dict(r.get("_params") or {})) for r in scored]
    names = sorted({k for f in factors for k in f if len({g.get(k) for g in factors}) > 1})
    if len(scored) < 2 or not names:
        return None
    distributions = {}
    for name in names:
        values = [f.get(name, "-") for f in factors]
        numbers = [_number(v) for v in values]
        if None in numbers:
            distributions[name] = CategoricalDistribution(sorted(set(values)))
        else:
            distributions[name] = FloatDistribution(min(numbers), max(numbers))
    with _quiet_optuna():
        study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for mode in objectives.values()])
    for row, f in zip(scored, factors):
        params = {n: float(f[n]) if isinstance(d, FloatDistribution) else f.get(n, "-") for n, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=[value_of(row, m) for m in objectives]))
    return study


def parallel_figure(rows: Sequence[dict[str, object]], objectives: dict[str, str], title: str = ""):
    """Optuna's parallel coordinates of the varied factors, coloured by the first objective; None
    when there is nothing to draw (see :func:`sweep_study`)."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    study = sweep_study(rows, objectives)
    if study is None:
        return None
    first = list(objectives)[0]
    with _quiet_optuna():
        axes = plot_parallel_coordinate(study, target=lambda t: t.values[0], target_name=first)
    axes.set_title(title or f"parallel coordinates, coloured by {first} ({objectives[first]})", y=1.03)
    axes.figure.set_size_inches(max(6.0, 1.6 * len(study.trials[0].params) + 2.5), 4.5)
    axes.figure.tight_layout()
    return axes.figure


def importance_figure(rows: Sequence[dict[str, object]], objectives: dict[str, str], title: str = ""):
    """Optuna's parameter importances (PED-ANOVA) of the varied factors for each objective; None
    when there is nothing to draw or too few trials to rank them."""
    from optuna.visualization.matplotlib import plot_param_importances

    study = sweep_study(rows, objectives)
    if study is None:
        return None
    with _quiet_optuna():
        warnings.simplefilter("ignore")  # PED-ANOVA's warnings on few trials too
        try:
            if len(objectives) == 1:
                axes = plot_param_importances(study, target=lambda t: t.values[0], target_name=list(objectives)[0])
            else:
                axes = plot_param_importances(study)
        except (ValueError, RuntimeError):
            return None
    axes.set_title(title or "parameter importances (PED-ANOVA)", loc="left")
    legend = axes.get_legend()
    for text, name in zip(legend.get_texts() if legend else [], objectives):  # Optuna says "Objective Value 0"
        text.set_text(name)
    axes.figure.tight_layout()
    return axes.figure
