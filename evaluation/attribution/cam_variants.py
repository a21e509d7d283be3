"""Grad-CAM's gradient-weighted relatives, at a convolutional layer, ReLU before upsampling as
Grad-CAM here (Rao et al.):

- Grad-CAM++ (Chattopadhay et al., 2018, https://arxiv.org/abs/1710.11063): channel weights
  ``w_c = sum_ij alpha_ij ReLU(g_ij)`` with ``alpha = g^2 / (2 g^2 + sum_ab(a) g^3 + 1e-6)`` (their
  Eq. 19, the exponential-score closed form; 0 where the gradient is 0), as the ``grad-cam``
  package computes them, then ``ReLU(sum_c w_c a_c)``.
- Layer-CAM (Jiang et al., 2021, https://ieeexplore.ieee.org/document/9462463): every position
  weighted by its own positive gradient, ``ReLU(sum_c ReLU(g_c) a_c)``.

Unlike the ``grad-cam`` package, maps are not min-max normalised per image (GridPG, DiFull and
EPG are ratios, and a per-image rescaling would hide a map that is all zero).
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import attribution_method, target_gradients, to_image_size

__all__ = ["grad_cam_plus_plus", "layer_cam"]

EPSILON = 1e-6  # the grad-cam package's, in alpha's denominator


@attribution_method("gradcampp", ("middle", "final"), "Grad-CAM++ (ReLU before upsampling)")
def grad_cam_plus_plus(
    model, images: torch.Tensor, targets: torch.Tensor, layer: str = "final", activation: torch.Tensor | None = None
) -> torch.Tensor:
    """Grad-CAM++ maps (B, H, W) of ``targets`` at ``layer`` (``middle`` or ``final``) for
    preprocessed ``images`` (B, C, H, W); ``activation``: ``model.forward_to(images, layer)`` if
    already computed."""
    activation, gradient = target_gradients(model, images, targets, layer, activation)
    squared = gradient**2
    alpha = squared / (2 * squared + activation.sum(dim=(2, 3), keepdim=True) * squared * gradient + EPSILON)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    weights = (gradient.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)
    return to_image_size((weights * activation).sum(dim=1).clamp(min=0), images.shape[-2:])


@attribution_method("layercam", ("middle", "final"), "Layer-CAM (ReLU before upsampling)")
def layer_cam(
    model, images: torch.Tensor, targets: torch.Tensor, layer: str = "final", activation: torch.Tensor | None = None
) -> torch.Tensor:
    """Layer-CAM maps (B, H, W) of ``targets`` at ``layer`` (``middle`` or ``final``) for
    preprocessed ``images`` (B, C, H, W); ``activation``: ``model.forward_to(images, layer)`` if
    already computed."""
    activation, gradient = target_gradients(model, images, targets, layer, activation)
    return to_image_size((gradient.clamp(min=0) * activation).sum(dim=1).clamp(min=0), images.shape[-2:])
