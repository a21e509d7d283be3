"""Guided Backprop (Springenberg et al., 2015, https://arxiv.org/abs/1412.6806), batched.

Backpropagation in which every ReLU module also zeroes negative gradients. The map is the guided
gradient with respect to the layer's activation, summed over channels (as captum's
``GuidedBackprop`` returns the guided gradient, not gradient x input). ReLUs must be modules
(``nn.ReLU``): functional ``torch.relu`` calls cannot be guided. torchvision's ReLUs work in place,
which a full backward hook refuses (REFERENCE section 6): inside the block they compute out of
place, and are switched back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from evaluation.attribution.common import ALL_LAYERS, attribution_method, target_gradients, to_image_size

__all__ = ["guided_backprop", "guided_relus"]


@contextmanager
def guided_relus(model: nn.Module):
    """Within the block, each ``nn.ReLU`` of ``model`` computes out of place and passes back only
    positive gradients; hooks and ``inplace`` flags are restored on exit, also after an error."""

    def clamp(module, grad_input, grad_output):
        return tuple(None if g is None else g.clamp(min=0) for g in grad_input)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    inplace = [m.inplace for m in relus]
    handles = []
    try:
        for m in relus:
            m.inplace = False
            handles.append(m.register_full_backward_hook(clamp))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(relus, inplace):
            m.inplace = flag


@attribution_method(
    "gbp", ALL_LAYERS, "Guided Backprop",
    refuses=(("vit", "a vision transformer has no ReLU to guide (its GELUs pass plain gradients)"),),
)
def guided_backprop(
    model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation: torch.Tensor | None = None
) -> torch.Tensor:
    """Guided Backprop maps summed over channels.

    Args:
        model: a layered model (``forward_to`` / ``forward_from``) that is an ``nn.Module``.
        images (Tensor): preprocessed inputs (B, C, H, W).
        targets (Tensor): (B,) int64 class to explain per row.
        layer (str): ``input``, ``middle`` or ``final``.
        activation (Tensor): optional, ``model.forward_to(images, layer)`` if already computed
            (the forward pass is the same; only the backward pass is guided).

    Returns:
        Tensor: (B, H, W) attribution maps.
    """
    with guided_relus(model):
        _, gradient = target_gradients(model, images, targets, layer, activation)
    return to_image_size(gradient.sum(dim=1), images.shape[-2:])
