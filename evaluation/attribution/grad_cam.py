"""Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391).

``map = ReLU(sum_c mean_hw(d y_t / d a_c) * a_c)`` at a convolutional layer, then upsampled
bilinearly. The ReLU comes before upsampling, as in Rao et al.'s code (REFERENCE section 4); it is
on by default, unlike captum's ``LayerGradCam`` (``relu_attributions=False``): ``relu=False`` keeps
the negative evidence (captum's default).
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import attribution_method, target_gradients, to_image_size

__all__ = ["grad_cam"]


@attribution_method("gradcam", ("middle", "final"), "Grad-CAM (ReLU before upsampling; relu=False drops it)")
def grad_cam(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "final",
    relu: bool = True,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad-CAM maps.

    Args:
        model: a layered model (``forward_to`` / ``forward_from``).
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class to explain per row.
        layer (str): ``middle`` or ``final``. Default: ``final``.
        relu (bool): clamp negative values of the map before upsampling. Default: True (Rao et al.;
            captum's default is False).
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed.

    Returns:
        Tensor: (B, H, W) attribution maps.
    """
    activation, gradient = target_gradients(model, images, targets, layer, activation)
    maps = (gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)
    if relu:
        maps = maps.clamp(min=0)
    return to_image_size(maps, images.shape[-2:])
