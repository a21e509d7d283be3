"""Ablation-CAM (Desai & Ramaswamy, WACV 2020), batched.

Each channel's weight is the relative drop of the target logit when that channel of the
activation is set to zero, ``w_c = (y_t - y_t^(c)) / y_t``; ``map = ReLU(sum_c w_c a_c)``, the ReLU
before upsampling (as Grad-CAM here, Rao et al.). Gradient-free: one forward from the layer per
channel. The ``grad-cam`` package's ``AblationCAM`` computes the same weights; it zeroes a channel
only when the activation's minimum is 0 (ReLU outputs, as at ResNet stages) and otherwise sets it
1e7 below the minimum. Rows that repeat one activation (the targets of one grid) share its
ablated forwards on models that treat all rows alike.
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import (
    attribution_method,
    layer_activation,
    model_rows,
    repeated_rows,
    select_targets,
    to_image_size,
)

__all__ = ["ablation_cam"]


@attribution_method("ablationcam", ("middle", "final"), "Ablation-CAM (each channel's relative logit drop)")
@torch.no_grad()
def ablation_cam(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "final",
    internal_batch_size: int = 256,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ablation-CAM maps (B, H, W) at ``middle`` or ``final``.

    Args:
        internal_batch_size (int): about this many ablated activations per forward pass.
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.
    """
    activation = layer_activation(model, images, layer, activation)
    original = select_targets(model.forward_from(activation, layer), targets)
    k = 1 if hasattr(model, "rows") else repeated_rows(activation)  # grid models tie rows to cells
    distinct, channels = activation[::k], activation.shape[1]
    ablated_logit = torch.empty(len(activation), channels, dtype=activation.dtype, device=activation.device)
    rows_per_pass = max(1, internal_batch_size // channels)
    for start in range(0, len(distinct), rows_per_pass):
        rows = torch.arange(start, min(start + rows_per_pass, len(distinct)))
        served = (rows[:, None] * k + torch.arange(k)).flatten()  # the batch rows these activations serve
        wanted = targets[served].to(activation.device).view(len(rows), k)
        per_chunk = max(1, internal_batch_size // len(rows))
        for first in range(0, channels, per_chunk):
            chosen = torch.arange(first, min(first + per_chunk, channels))
            # channel-major (ablated channel, row), so that a row model's cells repeat in step
            ablated = distinct[rows][None].repeat(len(chosen), 1, 1, 1, 1)
            ablated[torch.arange(len(chosen)), :, chosen.to(activation.device)] = 0
            logits = model_rows(model, rows).forward_from(ablated.flatten(0, 1), layer).view(len(chosen), len(rows), -1)
            picked = logits.gather(2, wanted[None].expand(len(chosen), -1, -1))  # (chosen, rows, k)
            ablated_logit[served[:, None], chosen[None, :]] = picked.permute(1, 2, 0).reshape(len(served), len(chosen))
    weights = (original[:, None] - ablated_logit) / original[:, None]
    return to_image_size((weights[:, :, None, None] * activation).sum(dim=1).clamp(min=0), images.shape[-2:])
