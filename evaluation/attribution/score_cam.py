"""Score-CAM (Wang et al., CVPR-W 2020, https://arxiv.org/abs/1910.01279), batched.

Each channel of the activation at the layer, upsampled to the input (bilinear, corners aligned)
and min-max scaled to [0, 1], masks the input; the target's probability for each masked input
(sigmoid for BCE probes, softmax for CE probes) is that channel's weight, as in the paper:
``map = ReLU(sum_k p_t(X * H_k) A_k)``, the ReLU before upsampling (as Grad-CAM, Rao et al.).

The ``grad-cam`` package (and code built on it) puts a softmax over the channels' probabilities
instead: those lie in [0, 1], so the softmax makes the weights nearly uniform (a max/min ratio of
1.000002 against 18,720 for the paper's weights on the demo's probe). On B-cos models the image x
is masked and re-encoded as ``[x, 1 - x]``, never the encoding itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from evaluation.attribution.common import (
    attribution_method,
    encoded_perturbation,
    layer_activation,
    model_rows,
    select_targets,
    to_image_size,
)

__all__ = ["score_cam"]


@attribution_method("scorecam", ("middle", "final"), "Score-CAM (Wang et al.'s weights)", uses_probabilities=True)
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
    """Score-CAM maps (B, H, W) at ``middle`` or ``final``.

    Args:
        probabilities: logits -> probabilities (sigmoid for BCE probes, softmax for CE probes).
        internal_batch_size (int): at most this many masked inputs per forward pass (at least
            one; a row's channels are split over several passes where they are more).
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.
    """
    activation = layer_activation(model, images, layer, activation)
    channels = activation.shape[1]
    flat = activation.flatten(2)
    constant = flat.amax(dim=2) == flat.amin(dim=2)  # (B, C)
    scores = torch.empty(len(images), channels, dtype=activation.dtype, device=activation.device)
    per_pass = max(1, internal_batch_size // channels)  # rows per pass
    for start in range(0, len(images), per_pass):
        rows = torch.arange(start, min(start + per_pass, len(images)))
        # A constant channel's mask is 0 everywhere (min-max scaling): the same masked input for
        # every such channel, so one forward per row gives all their weights. At 1x1 maps every
        # channel is constant: one forward instead of 2048 on a ResNet-50.
        varies = (~constant[rows]).any(dim=0).nonzero()[:, 0].cpu()  # on the CPU, as rows: they index scores together
        if len(varies) < channels:
            zero = torch.zeros_like(images[rows, :1])
            scores[rows] = _probability(model, images[rows], targets[rows], rows, zero, probabilities)[:, None]
        # at most internal_batch_size masked inputs per forward pass, a row's channels split if need be
        for chunk in varies.split(max(1, internal_batch_size // len(rows))) if len(varies) else ():
            masks = F.interpolate(activation[rows][:, chunk], size=images.shape[-2:], mode="bilinear", align_corners=True)
            low = masks.flatten(2).min(dim=2).values[:, :, None, None]
            high = masks.flatten(2).max(dim=2).values[:, :, None, None]
            # channel-major, so that the row model's cells repeat in step (see evaluation.grid_models)
            keep = ((masks - low) / (high - low + 1e-8)).transpose(0, 1)[:, :, None].flatten(0, 1)  # (chunk * rows, 1, H, W)
            n = len(chunk)
            p = _probability(model, images[rows].repeat(n, 1, 1, 1), targets[rows].repeat(n), rows, keep, probabilities)
            scores[rows[:, None], chunk[None, :]] = p.view(n, len(rows)).T
    maps = (scores[:, :, None, None] * activation).sum(dim=1).clamp(min=0)
    return to_image_size(maps, images.shape[-2:])


def _probability(model, inputs, targets, rows, keep, probabilities) -> torch.Tensor:
    """The target's probability for each of ``inputs`` (rows ``rows`` of the batch, repeated
    channel-major) masked by ``keep``."""
    return select_targets(probabilities(model_rows(model, rows)(encoded_perturbation(model, inputs, keep))), targets)
