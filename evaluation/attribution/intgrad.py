"""Integrated Gradients (Sundararajan et al., 2017, https://arxiv.org/abs/1703.01365), batched.

``map = sum_c (a_c - 0) * integral_0^1 d y_t(alpha a) / d a_c d alpha`` with a zero baseline at
the chosen layer (ML-Att: the activation plays the role of the input). The integral uses
Gauss-Legendre quadrature, captum's default, so maps equal captum's ``IntegratedGradients``.
All rows and steps share each forward pass; ``internal_batch_size`` bounds the rows per pass
(captum's default runs every step at once, REFERENCE section 6).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.attribution.common import ALL_LAYERS, attribution_method, layer_activation, repeated_rows, shared_forward_gradients, to_image_size
from evaluation.attribution.folding import merged_batchnorm

__all__ = ["integrated_gradients", "gauss_legendre"]


def gauss_legendre(n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha`` in (0, 1) and weights (summing to 1) of the n-point Gauss-Legendre rule."""
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return torch.from_numpy(0.5 * (nodes + 1.0)), torch.from_numpy(0.5 * weights)


@attribution_method("intgrad", ALL_LAYERS, "Integrated Gradients (zero baseline, 50 steps)")
def integrated_gradients(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    n_steps: int = 50,
    internal_batch_size: int = 256,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrated Gradients maps summed over channels.

    Args:
        model: a layered model (``forward_to`` / ``forward_from``).
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class to explain per row.
        layer (str): ``input``, ``middle`` or ``final``.
        n_steps (int): quadrature points. Default: 50 (the reference setting).
        internal_batch_size (int): at most this many rows per forward pass (at least one step of
            the whole batch).
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.

    Returns:
        Tensor: (B, H, W) attribution maps.
    """
    activation = layer_activation(model, images, layer, activation)
    # rows that repeat one activation (the targets of a grid) share each step's forward pass
    k = 1 if hasattr(model, "rows") else repeated_rows(activation)
    distinct, per_target = activation[::k], targets.view(-1, k)
    alphas, weights = (t.to(activation.dtype).to(activation.device) for t in gauss_legendre(n_steps))
    steps_per_pass = max(1, internal_batch_size // len(distinct))
    integral = torch.zeros_like(activation)
    per_step = (-1,) + (1,) * activation.dim()  # broadcasts a (steps,) vector over (steps, B, C, h, w)
    with merged_batchnorm(model):  # BatchNorm merged into the convolutions: same gradients, less work
        for start in range(0, n_steps, steps_per_pass):
            alpha = alphas[start : start + steps_per_pass]
            weight = weights[start : start + steps_per_pass]
            scaled = (alpha.view(per_step) * distinct.unsqueeze(0)).flatten(0, 1)  # (steps * U) rows
            step_targets = per_target.repeat(len(alpha), 1).flatten()  # (steps * U * k)
            gradient = shared_forward_gradients(lambda a: model.forward_from(a, layer), scaled, step_targets, k)
            integral += (gradient.view(len(alpha), *activation.shape) * weight.view(per_step)).sum(dim=0)
    return to_image_size((activation * integral).sum(dim=1), images.shape[-2:])
