"""Layer-wise Relevance Propagation with zennit's EpsilonGamma(Box) rules, batched.

As in the reference code: the ZBox rule (bounded by the preprocessed all-0 and all-1 images) on
the first convolution, the Gamma rule (gamma 0.25) on every other convolution, Epsilon on linear
layers (the probe's 1x1 layers, :class:`probing.heads.Pointwise`, are linear layers applied at
each position, as torchvision's ``fc``), the Norm rule on average pooling (a module in the probe,
as in torchvision's ResNet), BatchNorm merged into the convolution before it and residual sums made
explicit by canonizers (zennit's for torchvision ResNets and VGGs, :class:`BasicBlockCanonizer`
for the embedded ResNets). At an inner layer (ML-Att) the activation is the input and every
convolution gets the Gamma rule (an activation after a ReLU is not a bounded pixel).

Relevance starts at each row's target logit (the output times the one-hot target, as the How to
Probe code), not at 1: the rules divide by layer outputs, so starting from 1 would flip the map's
sign wherever the logit is negative. All rows run in one zennit pass; maps sum relevance over
channels. B-cos models and vision transformers are refused (no rule covers B-cos layers,
attention or LayerNorm). zennit's canonizers change the model while they are registered; the model
is restored afterwards whatever happens (:func:`~evaluation.attribution.common.restored_afterwards`).

In float32 a map depends slightly on which rows share a batch (the convolution kernels chosen
differ with the batch size). Measured on random-weight models with BatchNorm statistics set (16 rows
in one batch against 4 batches of 4): at most 1.8e-4 of a map's maximum at the input of the tiny
ResNet (4.2e-6 on ResNet-50 at 128 px), and at most 5.6e-6 in a GridPG score; float64 models
(``model.double()``) remove it.
The Gamma rule on Conv1d/2d/3d is :class:`~evaluation.attribution.lrp_gamma.CachedGamma`, zennit's
rule with its modified forward passes done once per forward pass: the targets of a grid share them.
"""

from __future__ import annotations

import torch
from torch import nn

from evaluation.attribution.common import (
    ALL_LAYERS,
    attribution_method,
    layer_activation,
    repeated_rows,
    restored_afterwards,
    shared_forward_gradients,
    to_image_size,
)
from evaluation.attribution.lrp_gamma import CachedGamma
from probing.heads import Pointwise

__all__ = ["lrp", "lrp_composite", "BasicBlockCanonizer"]


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu2(self.canonizer_sum(torch.stack([self.shortcut(x), out], dim=-1)))


def _clip_bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
    out = self.bn3(self.conv3(self.avgpool(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu3(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def BasicBlockCanonizer():  # noqa: N802 (a canonizer factory, named like the zennit classes it builds)
    """zennit canonizer for the residual blocks zennit does not know: ``probing.embedded_backbones.
    BasicBlock`` and CLIP's bottleneck (``probing.clip_resnet.ClipBottleneck``), their residual sum
    through a ``Sum`` module, as zennit's ResNetCanonizer does for torchvision's blocks."""
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    from probing.clip_resnet import ClipBottleneck
    from probing.embedded_backbones import BasicBlock

    def attributes(name, module):
        for kind, forward in ((BasicBlock, _basic_block_forward), (ClipBottleneck, _clip_bottleneck_forward)):
            if isinstance(module, kind):
                return {"forward": forward.__get__(module), "canonizer_sum": Sum()}
        return None

    return AttributeCanonizer(attributes)


def lrp_composite(low: torch.Tensor | None = None, high: torch.Tensor | None = None, gamma: float = 0.25):
    """EpsilonGammaBox when ``low``/``high`` bound the input, else the same rules without the box."""
    from zennit.composites import EpsilonGammaBox, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, Gamma
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    canonizers = [ResNetCanonizer(), BasicBlockCanonizer()]  # ResNetCanonizer merges BatchNorm everywhere too
    # the probe's pointwise layers are linear layers (first match wins); zennit's Gamma rule on the
    # other convolutions, computed once per forward pass instead of once per target (lrp_gamma.py)
    cached = [(Pointwise, Epsilon()), ((nn.Conv1d, nn.Conv2d, nn.Conv3d), CachedGamma(gamma=gamma))]
    if low is not None:
        return EpsilonGammaBox(low=low, high=high, gamma=gamma, canonizers=canonizers, layer_map=cached)
    layer_map = cached + layer_map_base() + [(Convolution, Gamma(gamma=gamma)), (nn.Linear, Epsilon())]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


class _FromLayer(nn.Module):
    """The model from a layer's activation to the logits, as the module zennit hooks."""

    def __init__(self, model, layer: str):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from(activation, self.layer)


NO_LRP_RULES = {
    "bcos": "zennit has no LRP rule for B-cos layers; use 'bcos' (their exact explanation) or a gradient method",
    "vit": "zennit has no LRP rule for attention and LayerNorm; use a gradient method",
}


@attribution_method(
    "lrp", ALL_LAYERS, "LRP, zennit EpsilonGammaBox with canonizers, from the target logit",
    refuses=tuple(NO_LRP_RULES.items()),
)
def lrp(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    gamma: float = 0.25,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """LRP relevance maps (B, H, W) of each row's target class at ``layer``.

    ``model`` needs ``preprocess`` at the input layer (for the ZBox bounds).
    """
    activation = layer_activation(model, images, layer, activation)
    low = high = None
    if layer == "input":
        # per-channel bounds (1, C, 1, 1): they broadcast to whatever the first convolution sees
        # (DiFull feeds it single cells, not the whole grid)
        blank = torch.zeros(1, 3, 1, 1, dtype=images.dtype, device=images.device)
        low, high = model.preprocess(blank), model.preprocess(blank + 1)
    # relevance starts at each row's target logit; rows that repeat one activation (the targets of
    # a grid) share the forward pass
    k = 1 if hasattr(model, "rows") else repeated_rows(activation)
    modified, composite = _FromLayer(model, layer), lrp_composite(low, high, gamma)
    with restored_afterwards(modified):
        try:
            composite.register(modified)
            relevance = shared_forward_gradients(
                modified, activation[::k], targets.to(activation.device), k, from_logit=True
            )
        finally:
            composite.remove()
    return to_image_size(relevance.sum(dim=1), images.shape[-2:])
