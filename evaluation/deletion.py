"""Deletion and insertion (Petsiuk et al., RISE, BMVC 2018), scored on the GridPG maps.

Both follow the model's probability of the explained class while the map's pixels change in
order, most relevant first, in ``steps`` equal parts (pixels of equal relevance in row-major
order):

- deletion: the pixels are set, part by part, to 0 of the model's input (the data set's mean
  colour after normalisation; black on B-cos models, whose image is perturbed before it is
  encoded). A map that finds the evidence makes the probability fall fast: **lower is better**.
- insertion: starting from the image blurred by a Gaussian (11 px, sigma 5, RISE's substrate;
  borders reflected), the pixels are put back part by part. **Higher is better.**

The score is the area under the curve of the ``steps + 1`` probabilities (0, 1/steps, ..., 1 of
the pixels changed) by the trapezoid rule, in [0, 1]. Every step is one forward pass of all rows
together. Non-finite map values count as least relevant.
"""

from __future__ import annotations

from typing import Callable

import torch

from evaluation.attribution.common import encoded_perturbation
from evaluation.metrics import localisation_metric
from evaluation.smoothing import Smoothing, smooth

__all__ = ["STEPS", "area_under_curve", "deletion", "insertion", "probability_curve", "relevance_ranks"]

STEPS = 20  # 5% of the pixels per step: 21 forward passes per batch of rows
BLUR = Smoothing("gaussian", 11, 5.0)


def relevance_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H * W): each pixel's rank in its map, 0 for the most relevant."""
    order = torch.sort(maps.flatten(1).nan_to_num(nan=-torch.inf), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


@torch.no_grad()
def probability_curve(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    fill: torch.Tensor | float,
    steps: int = STEPS,
    insert: bool = False,
) -> torch.Tensor:
    """(B, steps + 1) probability of each row's target as the k/steps most relevant pixels of
    ``inputs`` are replaced by ``fill`` (``insert=False``), or as they are put back into ``fill``
    (``insert=True``), for k = 0 .. steps.

    Args:
        model: the explained model; ``inputs`` (B, C, H, W) as it takes them (preprocessed).
        maps (Tensor): (B, H, W) maps at the inputs' size.
    """
    if maps.shape != (inputs.shape[0], *inputs.shape[-2:]):
        raise ValueError(f"maps {tuple(maps.shape)} do not fit inputs {tuple(inputs.shape)}: upsample them to the image")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch, height, width = maps.shape
    ranks = relevance_ranks(maps).view(batch, 1, height, width)
    rows = torch.arange(batch, device=inputs.device)
    curve = []
    for k in range(steps + 1):
        changed = (ranks < k * height * width // steps).to(inputs.dtype)
        keep = changed if insert else 1 - changed
        curve.append(probabilities(model(encoded_perturbation(model, inputs, keep, fill)))[rows, targets])
    return torch.stack(curve, dim=1)


def area_under_curve(curve: torch.Tensor) -> torch.Tensor:
    """(B, K + 1) values at 0, 1/K, ..., 1 -> (B,) trapezoid area over [0, 1]."""
    return (curve[:, :-1] + curve[:, 1:]).sum(dim=1) / (2 * (curve.shape[1] - 1))


@localisation_metric("deletion", "perturbation", "area under the probability as the most relevant pixels are removed; lower is better")
def deletion(model, inputs, targets, maps, probabilities, steps: int = STEPS) -> torch.Tensor:
    """(B,) deletion score of each row's map (see the module docstring)."""
    return area_under_curve(probability_curve(model, inputs, targets, maps, probabilities, 0.0, steps))


@localisation_metric("insertion", "perturbation", "area under the probability as the most relevant pixels are put into a blurred image; higher is better")
def insertion(model, inputs, targets, maps, probabilities, steps: int = STEPS) -> torch.Tensor:
    """(B,) insertion score of each row's map (see the module docstring)."""
    blurred = smooth(inputs.flatten(0, 1), BLUR).view_as(inputs)
    return area_under_curve(probability_curve(model, inputs, targets, maps, probabilities, blurred, steps, insert=True))
