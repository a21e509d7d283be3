"""A trial's per-row localisation scores: collected from the evaluators' ``on_rows``, turned into
bootstrap intervals, and stored as one compact table per metric (``scores/<metric>.csv.gz``) so
that a report can pair two probes on the rows both scored.

A row is one explained grid cell (grid metrics) or one (image, class) (EPG). Every grid the probe
classifies correctly is stored; ``headline`` marks those of its headline score (the grids it is
confident on), the rows the intervals are over. The bootstrap
resamples **units**: a grid's explained cells share one image and move together, so a grid
metric's unit is the grid (the mean of its cells); an EPG row is its own unit.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import torch

from evaluation.intervals import percentile_interval

__all__ = ["COLUMNS", "ScoreRows", "headline_rows", "read_rows", "unit_scores"]

COLUMNS = ("method", "layer", "grid", "cell", "class", "image", "confidence", "headline", "score")
INTEGER_COLUMNS = ("grid", "cell", "class", "image", "headline")


def headline_rows(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows that count in the trial's headline score (``headline`` 1: a grid the probe is
    confident on; every EPG row)."""
    if "headline" not in columns:
        return columns
    keep = np.asarray(columns["headline"]).astype(bool)
    return {name: np.asarray(values)[keep] for name, values in columns.items()}


def unit_scores(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(unit ids, unit scores)``: per grid (the mean of its rows, grids in order of their ids)
    when the rows have a ``grid`` column, else ``(image * 1_000_000 + class, score)`` per row."""
    score = np.asarray(columns["score"], dtype=float)
    if "grid" in columns and len(columns["grid"]) and int(np.asarray(columns["grid"])[0]) >= 0:
        ids, inverse = np.unique(np.asarray(columns["grid"]), return_inverse=True)
        return ids, np.bincount(inverse, weights=score) / np.bincount(inverse)
    return np.asarray(columns["image"]) * 1_000_000 + np.asarray(columns["class"]), score


class ScoreRows:
    """The rows of every ``(metric, method, layer)`` of one trial (pass :meth:`add` as ``on_rows``)."""

    def __init__(self):
        self.rows: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}

    def add(self, key: tuple[str, str, str], columns: dict[str, torch.Tensor]) -> None:
        self.rows[key] = {name: values.detach().cpu().numpy() for name, values in columns.items()}

    def intervals(self, seed: int = 0) -> dict[str, float]:
        """``<metric>/<method>/<layer>/ci_low`` and ``/ci_high``: the 95% percentile bootstrap
        interval of each headline score over its units; the scores that share units (every method
        and layer of a metric) share the resamples, in one call."""
        out: dict[str, float] = {}
        for metric in dict.fromkeys(key[0] for key in self.rows):
            keys = [key for key in self.rows if key[0] == metric]
            units = [unit_scores(headline_rows(self.rows[key])) for key in keys]
            if any(not np.array_equal(ids, units[0][0]) for ids, _ in units):  # not expected: one call per score
                bounds = [percentile_interval(values, seed=seed) for _, values in units]
                lows, highs = (np.array(b) for b in zip(*bounds))
            else:
                lows, highs = percentile_interval(np.stack([values for _, values in units], axis=1), seed=seed)
            for (metric_, method, layer), low, high in zip(keys, lows, highs):
                out[f"{metric_}/{method}/{layer}/ci_low"] = float(low)
                out[f"{metric_}/{method}/{layer}/ci_high"] = float(high)
        return out

    def write(self, folder: Path) -> list[Path]:
        """One ``<metric>.csv.gz`` per metric in ``folder`` (columns :data:`COLUMNS`; ``grid`` and
        ``cell`` are -1 and ``headline`` 1 on EPG rows); returns the files."""
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for metric in dict.fromkeys(key[0] for key in self.rows):
            path = folder / f"{metric}.csv.gz"
            with gzip.open(path, "wt", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(COLUMNS)
                for (metric_, method, layer), columns in self.rows.items():
                    if metric_ != metric:
                        continue
                    n = len(columns["score"])
                    table = [columns.get(name, np.full(n, 1 if name == "headline" else -1)) for name in COLUMNS[2:]]
                    for grid, cell, cls, image, confidence, headline, score in zip(*table):
                        integers = (int(v) for v in (grid, cell, cls, image))
                        writer.writerow([method, layer, *integers, f"{confidence:.6g}", int(headline), f"{score:.9g}"])
            files.append(path)
        return files


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """A ``scores/<metric>.csv.gz`` table back as ``{(method, layer): columns}``."""
    parts: dict[tuple[str, str], list[list[str]]] = {}
    with gzip.open(path, "rt", newline="") as stream:
        reader = csv.reader(stream)
        if tuple(next(reader)) != COLUMNS:
            raise ValueError(f"{path}: not a score table (its header is not {', '.join(COLUMNS)})")
        for method, layer, *values in reader:
            parts.setdefault((method, layer), []).append(values)
    out = {}
    for key, lines in parts.items():
        table = np.array(lines, dtype=float).T
        out[key] = {name: table[i].astype(np.int64) if name in INTEGER_COLUMNS else table[i] for i, name in enumerate(COLUMNS[2:])}
    return out
