"""Do methods, layers and smoothing kernels rank the same grids alike? (Rao et al., CVPR 2022)

For one metric, every (method, layer) score of a probe is a column over the units it scored
(GridPG: the shared candidate grids; EPG: the (image, class) rows). Two columns agree when they
rank the units alike: Spearman's rank correlation over the units both hold (average ranks for
ties). Trials that differ only in their smoothing or method options are the same probe
explained with other kernels or settings, so their columns are compared too, labelled with them.
Each pair's correlation is computed within one probe and averaged (a plain mean) over the probes
that have both columns: the agreement of two ways of explaining, not of two probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from sweeps.effects import TrialScores

__all__ = ["Agreement", "agreement_csv", "agreement_figure", "agreement_matrix", "method_agreement", "spearman"]

SMOOTHING = "smoothing"
MIN_UNITS = 3  # a rank correlation over fewer units says nothing


@dataclass(frozen=True)
class Agreement:
    metric: str
    a: str  # method/layer, with " @ smoothing <kernel>" where the sweep varied it (and method options)
    b: str
    rho: float  # mean over probes
    probes: int
    units: int  # units of the pair, summed over probes


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties); NaN when
    either is constant."""
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    norm = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / norm) if norm > 0 else float("nan")


def _explanation(factor: str) -> bool:
    """Settings of the explanation, not of the probe: the smoothing and the method options."""
    return factor == SMOOTHING or factor.startswith("method.")


def _columns(trials: Sequence[TrialScores]) -> dict[tuple, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Per probe (its factors but the explanation's) and metric: ``{column label: (unit ids, scores)}``."""
    names = {k for t in trials for k in t.factors if _explanation(k)}
    varied = [k for k in sorted(names) if len({t.factors.get(k) for t in trials}) > 1]
    probes: dict[tuple, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
    for trial in trials:
        probe = tuple(sorted((k, v) for k, v in trial.factors.items() if not _explanation(k)))
        setting = ", ".join(f"{k.removeprefix('method.')} {trial.factors.get(k, '?')}" for k in varied)
        for score, units in trial.units.items():
            metric, pair = score.split("/", 1)
            probes.setdefault(probe, {}).setdefault(metric, {})[f"{pair} @ {setting}" if setting else pair] = units
    return probes


def method_agreement(trials: Sequence[TrialScores]) -> list[Agreement]:
    """Every pair of columns of each metric (see the module docstring), in a fixed order: metrics
    by name, columns in the order the trials hold them."""
    sums: dict[tuple[str, str, str], list[float]] = {}
    units: dict[tuple[str, str, str], int] = {}
    order: dict[str, dict[str, None]] = {}
    for metrics in _columns(trials).values():
        for metric, columns in metrics.items():
            order.setdefault(metric, {}).update(dict.fromkeys(columns))
            for a, b in combinations(columns, 2):
                shared, in_a, in_b = np.intersect1d(columns[a][0], columns[b][0], assume_unique=True, return_indices=True)
                if len(shared) < MIN_UNITS:
                    continue
                rho = spearman(columns[a][1][in_a], columns[b][1][in_b])
                if math.isnan(rho):
                    continue
                sums.setdefault((metric, a, b), []).append(rho)
                units[(metric, a, b)] = units.get((metric, a, b), 0) + len(shared)
    out = []
    for metric in sorted(order):
        labels = list(order[metric])
        for a, b in combinations(labels, 2):
            key = (metric, a, b) if (metric, a, b) in sums else (metric, b, a)
            if key in sums:
                out.append(Agreement(metric, a, b, float(np.mean(sums[key])), len(sums[key]), units[key]))
    return out


def agreement_csv(rows: Sequence[Agreement]) -> str:
    """The agreements as CSV text, one pair per line."""
    lines = [f"{r.metric},{r.a},{r.b},{r.rho:.6g},{r.probes},{r.units}" for r in rows]
    return "\n".join(["metric,a,b,spearman,probes,units", *lines]) + "\n"


def agreement_matrix(rows: Sequence[Agreement], metric: str) -> tuple[list[str], np.ndarray]:
    """One metric's columns in order of appearance and their symmetric rho matrix (1 on the
    diagonal, NaN where no probe had both columns)."""
    mine = [r for r in rows if r.metric == metric]
    labels = list(dict.fromkeys(label for r in mine for label in (r.a, r.b)))
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for r in mine:
        matrix[index[r.a], index[r.b]] = matrix[index[r.b], index[r.a]] = r.rho
    return labels, matrix


def agreement_figure(rows: Sequence[Agreement], metric: str, title: str = ""):
    """A heat map of one metric's agreements (Spearman's rho, -1 blue to 1 red; blank where no
    probe had both columns), each cell labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = agreement_matrix(rows, metric)
    size = 2.5 + 0.6 * len(labels)
    figure, axes = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    image = axes.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    figure.colorbar(image, ax=axes, label="Spearman's rho over shared units, mean over probes")
    axes.set_title(title or f"{metric}: agreement of methods and layers")
    figure.tight_layout()
    return figure
