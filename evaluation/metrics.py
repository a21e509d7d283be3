"""The localisation metrics a sweep can log: one registry, filled beside each metric's code.

A metric is scored on one of three protocols:

- ``grids``: n x n grids of confidently classified single-label images (Rao et al., CVPR 2022).
  GridPG explains the plain model; DiFull and DiPart explain a grid model built from it
  (:mod:`evaluation.grid_models`), whose correct attribution is known.
- ``boxes``: (image, class) rows of multi-label images with boxes, scored against the class's
  boxes: the Energy Pointing Game and the pointing game (:mod:`evaluation.epg`).
- ``maps``: a property of the maps GridPG explains (compactness, complexity;
  :mod:`evaluation.map_metrics`), scored on the same grids and rows.
- ``perturbation``: the model's response as the GridPG maps' pixels are removed or inserted in
  order (deletion, insertion; :mod:`evaluation.deletion`), on the same grids and rows.

The score functions themselves are pure (:mod:`evaluation.localization`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from probing.registry import Registry

__all__ = ["GRID_EVALUATED", "METRICS", "Metric", "grid_metrics", "list_metrics", "localisation_metric"]

PROTOCOL_NEEDS = {
    "grids": "single-label images for its grids",
    "boxes": "a data set with boxes (voc2007, coco2014)",
    "maps": "single-label images for the GridPG grids it is scored on",
    "perturbation": "single-label images for the GridPG grids it is scored on",
}
Protocol = Literal["grids", "boxes", "maps", "perturbation"]
GRID_EVALUATED = ("grids", "maps", "perturbation")  # the protocols evaluation.gridpg scores


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        protocol: ``grids``, ``boxes``, ``maps`` or ``perturbation`` (see the module docstring).
        grid_model: ``grids`` only: ``(model, grid, cells) -> the model to explain``, or None for
            the plain model.
        score: ``maps``: ``maps (B, H, W) -> (B,)``; ``boxes``: ``(maps, masks) -> (B,)``;
            ``perturbation``: ``(model, inputs, targets, maps, probabilities) -> (B,)``.
    """

    name: str
    protocol: Protocol
    description: str
    grid_model: Callable | None = None
    score: Callable | None = None

    @property
    def needs(self) -> str:
        """What a data set must have for this metric (for the spec's error)."""
        return PROTOCOL_NEEDS[self.protocol]


METRICS: Registry[Metric] = Registry("metric")


def localisation_metric(name: str, protocol: Protocol, description: str):
    """Decorator registering the metric ``name``; on a grid model class (or None-returning
    function for the plain model) it also records how to build the model that is explained, on
    the other protocols' function how it scores."""

    def add(obj):
        METRICS.register(name)(
            Metric(name, protocol, description, obj if protocol == "grids" else None, obj if protocol != "grids" else None)
        )
        return obj

    return add


def grid_metrics(names=None, protocols: tuple[str, ...] = ("grids",)) -> tuple[str, ...]:
    """The ``grids`` metrics among ``names`` (default: all registered), in their given order; with
    ``protocols=GRID_EVALUATED`` those the grid evaluation scores."""
    names = METRICS.names() if names is None else names
    return tuple(n for n in names if METRICS.get(n).protocol in protocols)


def list_metrics(pattern: str = "*") -> list[str]:
    """Registered metric names matching a shell-style ``pattern``."""
    return METRICS.names(pattern)
