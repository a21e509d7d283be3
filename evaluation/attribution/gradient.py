"""Gradient (Simonyan et al., 2014, https://arxiv.org/abs/1312.6034): the map is the gradient of
the target logit, summed over channels as every ML-Att map (Rao et al. 2022); at an inner layer
the gradient with respect to the activation, upsampled bilinearly. Signed by default, as Rao et
al.'s code calls captum's ``Saliency`` (``abs=False``); ``abs=True`` sums the magnitudes instead
(captum's default, the original "saliency map" up to the channel max).
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import ALL_LAYERS, attribution_method, target_gradients, to_image_size

__all__ = ["gradient"]


@attribution_method("grad", ALL_LAYERS, "Gradient (saliency; abs=True sums magnitudes)")
def gradient(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    abs: bool = False,  # noqa: A002 - captum's name for the option
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient maps summed over channels.

    Args:
        model: a layered model (``forward_to`` / ``forward_from``).
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class to explain per row.
        layer (str): ``input``, ``middle`` or ``final``.
        abs (bool): sum the gradient's magnitudes over channels. Default: False (signed).
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.

    Returns:
        Tensor: (B, H, W) attribution maps.
    """
    _, grad = target_gradients(model, images, targets, layer, activation)
    return to_image_size((grad.abs() if abs else grad).sum(dim=1), images.shape[-2:])
