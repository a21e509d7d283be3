"""Score-CAM (Wang et al., CVPR-W 2020), batched, as the ``grad-cam`` package computes it.

Each channel of the activation at the layer, upsampled to the input (bilinear, corners aligned)
and min-max scaled to [0, 1], masks the input; the target's probability for each masked input
(sigmoid for BCE probes, softmax for CE probes), softmax-normalised over channels, weights the
channels: ``map = sum_k w_k A_k``, upsampled. No final ReLU (as Grad-CAM here); GridPG ignores
negative values anyway.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from evaluation.attribution.common import layer_activation, model_rows, select_targets, to_image_size

__all__ = ["score_cam"]


@torch.no_grad()
def score_cam(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "final",
    probabilities: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.softmax(dim=1),
    internal_batch_size: int = 256,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score-CAM maps (B, H, W) at ``middle`` or ``final``."""
    activation = layer_activation(model, images, layer, activation)
    channels = activation.shape[1]
    masks = F.interpolate(activation, size=images.shape[-2:], mode="bilinear", align_corners=True)
    low = masks.flatten(2).min(dim=2).values[:, :, None, None]
    high = masks.flatten(2).max(dim=2).values[:, :, None, None]
    masks = (masks - low) / (high - low + 1e-8)
    scores = torch.empty(len(images), channels, dtype=activation.dtype, device=activation.device)
    per_pass = max(1, internal_batch_size // channels)  # rows per forward, all their channels at once
    for start in range(0, len(images), per_pass):
        rows = torch.arange(start, min(start + per_pass, len(images)))
        # channel-major, so that the row model's cells repeat in step (see evaluation.grid_models)
        masked = (images[rows][None] * masks[rows].transpose(0, 1)[:, :, None]).flatten(0, 1)
        logits = model_rows(model, rows)(masked)
        p = select_targets(probabilities(logits), targets[rows].repeat(channels))
        scores[rows] = p.view(channels, len(rows)).T
    weights = scores.softmax(dim=1)
    return to_image_size((weights[:, :, None, None] * activation).sum(dim=1), images.shape[-2:])
