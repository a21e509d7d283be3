"""The B-cos explanation (Böhle et al., CVPR 2022): the dynamic linear contribution map.

With the dynamic scaling of every B-cos module detached (``probing.heads.explanation_mode``), a
B-cos network computes ``y = W(x) x`` and ``x * d y / d x`` sums exactly to ``y`` (minus the
logit bias). The map is that product summed over channels (all 6 of ``[x, 1 - x]`` at the input)
at any ML-Att layer. On a model without B-cos modules it equals Input x Gradient.
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import ALL_LAYERS, attribution_method
from evaluation.attribution.ixg import input_x_gradient
from probing.heads import explanation_mode

__all__ = ["bcos_explanation"]


@attribution_method("bcos", ALL_LAYERS, "B-cos explanation (dynamic linear contributions)")
def bcos_explanation(
    model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation: torch.Tensor | None = None
) -> torch.Tensor:
    """B-cos contribution maps (B, H, W) of each row's target class at ``layer`` (``activation``:
    optional, shared; explanation mode changes the backward pass only)."""
    with explanation_mode(model):
        return input_x_gradient(model, images, targets, layer=layer, activation=activation)
