"""A probed model: frozen backbone + trained head, with the layer interface evaluation needs."""

from __future__ import annotations

import torch
from torch import nn

from probing.backbones import StagedBackbone

__all__ = ["ProbedModel"]


class ProbedModel(nn.Module):
    """Backbone and head as one classifier on preprocessed images.

    ``forward_to(x, layer)`` and ``forward_from(a, layer)`` split the network at an ML-Att layer
    (``input``, ``middle``, ``final``), so an attribution method can treat the activation there as
    its input with one forward pass and no hooks.
    """

    def __init__(self, backbone: StagedBackbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.backbone.config.layer_stages)

    @property
    def bcos_input(self) -> bool:
        """The input is the B-cos encoding ``[x, 1 - x]`` (perturbation methods perturb x)."""
        return self.backbone.config.bcos_input

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.preprocess(images)

    def forward_to(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        return self.backbone.forward_to(x, layer)

    def forward_from(self, activation: torch.Tensor, layer: str) -> torch.Tensor:
        """Logits (B, K) from the activation at ``layer``."""
        return self.head(self.backbone.forward_from(activation, layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> logits (B, K)."""
        return self.head(self.backbone(x))
