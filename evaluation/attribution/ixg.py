"""Input x Gradient (Shrikumar et al., 2016, https://arxiv.org/abs/1605.01713).

At an inner layer (ML-Att, Rao et al. 2022) the activation plays the role of the input:
``map = sum_c a_c * d y_t / d a_c``, upsampled bilinearly to the image size.
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import ALL_LAYERS, attribution_method, target_gradients, to_image_size

__all__ = ["input_x_gradient"]


@attribution_method("ixg", ALL_LAYERS, "Input x Gradient")
def input_x_gradient(
    model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation: torch.Tensor | None = None
) -> torch.Tensor:
    """Input x Gradient maps summed over channels.

    Args:
        model: a layered model (``forward_to`` / ``forward_from``).
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class to explain per row.
        layer (str): ``input``, ``middle`` or ``final``.
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.

    Returns:
        Tensor: (B, H, W) attribution maps.
    """
    activation, gradient = target_gradients(model, images, targets, layer, activation)
    return to_image_size((activation * gradient).sum(dim=1), images.shape[-2:])
