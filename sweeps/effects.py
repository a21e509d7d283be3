"""What a sweep's factors do to explanation quality, with uncertainty, from the per-row scores its
trials stored (``scores/<metric>.csv.gz``, see :mod:`evaluation.score_rows`).

- **Paired effects.** For each factor the sweep varied (loss, head, B exponent, backbone,
  smoothing, ...), each of its levels is compared with the factor's first level (its baseline,
  in the order the trials started: the spec's, ``bce - ce``). Two trials pair when every other
  setting, the seed included, is the same. A pair's difference is taken per unit both probes
  scored: a shared candidate grid both classify correctly (top-1, a rule that means the same
  under softmax and sigmoid, where a confidence threshold does not; not only the grids of their
  headline scores, which may share none), an EPG (image, class). A unit seen by several pairs (other heads, other seeds)
  takes the mean of their differences. The effect is the mean over units, its interval the 95%
  percentile bootstrap over units, its p-value the bootstrap-t one; Holm's adjustment runs over
  every effect of the report together and marks those still below 0.05. Effects are reported per
  backbone (the backbone's own effect over all backbones).
- **Seed replicates.** Trials that differ only in ``seed`` form one configuration; its score is
  the mean of the replicates' headline scores, with a hierarchical bootstrap interval (resample
  seeds, then units).

Both intervals take the trained probes as given: they cover the draw of grids (and, for
replicates, of seeds), not the grids a larger ``evaluate.n_grids`` would add.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.intervals import LEVEL, bootstrap_pvalues, hierarchical_interval, holm, percentile_interval
from evaluation.score_rows import headline_rows, read_rows, unit_scores
from sweeps.run_params import factors_of, run_params
from sweeps.tracking import quiet_downloads

__all__ = [
    "Effect", "TrialScores", "effects_csv", "forest_figure", "load_trial_scores", "paired_effects",
    "replicate_scores",
]

ALPHA = 1 - LEVEL
SEED = "seed"


@dataclass(frozen=True)
class TrialScores:
    """One trial's settings as factors (``backbone``, ``loss``, ``head``, ..., ``seed``) and its
    per-unit scores, ``{"gridpg/ixg/input": (unit ids, unit scores)}``: on every grid it scored
    (``units``, those it classifies correctly: what pairs) and on those of its headline score
    (``headline``, the grids it is confident on; default: ``units``)."""

    trial: str
    factors: dict[str, str]
    units: dict[str, tuple[np.ndarray, np.ndarray]]
    headline: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def headline_units(self, score: str) -> tuple[np.ndarray, np.ndarray]:
        return (self.headline if self.headline is not None else self.units)[score]


@dataclass(frozen=True)
class Effect:
    factor: str
    level: str
    baseline: str
    backbone: str  # "all" for the backbone's own effect
    score: str  # <metric>/<method>/<layer>
    mean: float
    low: float
    high: float
    units: int
    pairs: int
    p: float
    p_holm: float = float("nan")

    @property
    def significant(self) -> bool:
        return bool(self.p_holm < ALPHA)

    @property
    def label(self) -> str:
        return f"{self.factor} {self.level} - {self.baseline}"


def load_trial_scores(uri: str, runs, shared: dict[str, str] | None = None) -> list[TrialScores]:
    """The stored per-row scores of MLflow runs (those without a ``scores`` artifact have none);
    ``shared``: the params of the sweep's parent run, which its trials have alike."""
    from mlflow import MlflowClient

    client, out = MlflowClient(uri), []
    # no progress bar per file on the report's console (put back as it was on the way out)
    with quiet_downloads():
        for run in runs:
            units: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            headline: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            with tempfile.TemporaryDirectory() as folder:
                stored = [f.path for f in client.list_artifacts(run.info.run_id, "scores") if f.path.endswith(".csv.gz")]
                for path in stored:
                    local = Path(client.download_artifacts(run.info.run_id, path, folder))
                    metric = local.name.removesuffix(".csv.gz")
                    for (method, layer), columns in read_rows(local).items():
                        units[f"{metric}/{method}/{layer}"] = unit_scores(columns)
                        headline[f"{metric}/{method}/{layer}"] = unit_scores(headline_rows(columns))
            trial = run.data.tags.get("trial_id", run.info.run_name)
            out.append(TrialScores(trial, factors_of(run_params(run.data.params, shared or {})), units, headline))
    return out


# the probe's own factors first, the backbone's last (it is the stratum of the others)
FACTOR_ORDER = ("loss", "head", "smoothing")


def _varied(trials: Sequence[TrialScores]) -> dict[str, list[str]]:
    """Each factor with more than one level, its levels in trial order (the first is the baseline);
    the factors in :data:`FACTOR_ORDER`, then by name, ``backbone`` last."""
    levels: dict[str, dict[str, None]] = {}
    for trial in trials:
        for name, value in trial.factors.items():
            levels.setdefault(name, {})[value] = None
    varied = [name for name, values in levels.items() if len(values) > 1 and name != SEED]

    def rank(name: str) -> tuple[int, str]:
        return (FACTOR_ORDER.index(name) if name in FACTOR_ORDER else len(FACTOR_ORDER) + (name == "backbone"), name)

    return {name: list(levels[name]) for name in sorted(varied, key=rank)}


def _per_unit(differences: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The pairs' ``(unit ids, differences)`` as one difference per unit (the mean over pairs), by unit id."""
    ids = np.concatenate([i for i, _ in differences])
    values = np.concatenate([d for _, d in differences])
    _, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse, weights=values) / np.bincount(inverse)


def paired_differences(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(shared unit ids, b - a on them)`` for two trials' unit scores of one score."""
    shared, in_a, in_b = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    return shared, b[1][in_b] - a[1][in_a]


def paired_effects(trials: Sequence[TrialScores], seed: int = 0) -> list[Effect]:
    """Every paired effect of the factors the trials vary (see the module's docstring), Holm-adjusted together."""
    effects: list[Effect] = []
    for factor, levels in _varied(trials).items():
        baseline = levels[0]

        def rest(trial):
            return tuple(sorted((k, v) for k, v in trial.factors.items() if k != factor))

        for level in levels[1:]:
            pairs = [
                (a, b) for a in trials if a.factors.get(factor) == baseline
                for b in trials if b.factors.get(factor) == level and rest(a) == rest(b)
            ]  # fmt: skip
            strata = {"all"} if factor == "backbone" else {a.factors.get("backbone", "?") for a, _ in pairs}
            for backbone in sorted(strata):
                chosen = [(a, b) for a, b in pairs if backbone in ("all", a.factors.get("backbone", "?"))]
                for score in sorted({s for a, b in chosen for s in a.units if s in b.units}):
                    found = [paired_differences(a.units[score], b.units[score]) for a, b in chosen if score in a.units and score in b.units]
                    found = [(ids, d) for ids, d in found if len(ids)]
                    if not found:
                        continue
                    d = _per_unit(found)
                    low, high = percentile_interval(d, seed=seed)
                    p = float(bootstrap_pvalues(d, seed=seed)) if len(d) > 1 else float("nan")
                    effects.append(Effect(factor, level, baseline, backbone, score, float(d.mean()), float(low), float(high), len(d), len(found), p))
    tested = [i for i, e in enumerate(effects) if not np.isnan(e.p)]
    adjusted = holm([effects[i].p for i in tested]) if tested else []
    for i, p_holm in zip(tested, adjusted):
        e = effects[i]
        effects[i] = Effect(**{**e.__dict__, "p_holm": float(p_holm)})
    return effects


def replicate_scores(trials: Sequence[TrialScores], seed: int = 0) -> list[dict[str, object]]:
    """One row per configuration with more than one seed: its factors (``seed`` as the replicates'
    seeds), ``seeds`` (how many) and per score ``(mean, low, high)`` by the hierarchical bootstrap."""
    groups: dict[tuple, list[TrialScores]] = {}
    for trial in trials:
        groups.setdefault(tuple(sorted((k, v) for k, v in trial.factors.items() if k != SEED)), []).append(trial)
    rows = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        scores = {s: None for t in members for s in t.units}
        row: dict[str, object] = dict(key) | {SEED: ", ".join(t.factors.get(SEED, "?") for t in members), "seeds": len(members)}
        for score in scores:
            row[score] = hierarchical_interval([t.headline_units(score)[1] for t in members if score in t.units], seed=seed)
        rows.append(row)
    return rows


def effects_csv(effects: Sequence[Effect]) -> str:
    """The effects as CSV text, one per line."""
    head = "factor,level,baseline,backbone,score,mean,ci_low,ci_high,units,pairs,p,p_holm,significant"
    lines = [
        f"{e.factor},{e.level},{e.baseline},{e.backbone},{e.score},{e.mean:.6g},{e.low:.6g},{e.high:.6g},"
        f"{e.units},{e.pairs},{e.p:.4g},{e.p_holm:.4g},{int(e.significant)}"
        for e in effects
    ]
    return "\n".join([head, *lines]) + "\n"


def forest_figure(effects: Sequence[Effect], title: str = ""):
    """A forest plot: one line per effect (mean and 95% interval), filled where Holm-significant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.2 + 0.28 * max(1, len(effects))
    figure, axes = plt.subplots(figsize=(8, height), dpi=100)
    for y, e in enumerate(reversed(effects)):
        color = "tab:red" if e.significant else "0.35"
        axes.plot([e.low, e.high], [y, y], color=color, linewidth=1.5)
        axes.plot([e.mean], [y], "o", color=color, markerfacecolor=color if e.significant else "white")
    axes.axvline(0.0, color="0.6", linestyle="--", linewidth=1)
    axes.set_yticks(range(len(effects)), [f"{e.label} | {e.backbone} | {e.score}" for e in reversed(effects)], fontsize=7)
    axes.set_xlabel("paired effect (mean difference per grid) with 95% bootstrap interval; filled: Holm p < 0.05")
    axes.set_title(title or "effects")
    figure.tight_layout()
    return figure
