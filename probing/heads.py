"""Probes: classification heads trained on a frozen backbone's last feature map.

As in the reference code of "How to Probe" (Gairola et al., ICLR 2025), a head is applied as 1x1
convolutions to the spatial feature map and global average pooling comes *after* it. For a linear
head this equals a linear layer on pooled features; for an MLP it does not, and it keeps the
final-layer attributions faithful to the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from probing.registry import Registry

__all__ = ["HEADS", "Head", "create_head", "list_heads", "default_logit_bias"]

HEADS: Registry = Registry("head")


class Head(nn.Module):
    """1x1-convolution body, global average pooling, then a constant logit bias.

    Args:
        body (nn.Module): (B, C, h, w) -> (B, K, h, w).
        logit_bias (float): constant added to every logit after pooling.
    """

    def __init__(self, body: nn.Module, logit_bias: float = 0.0):
        super().__init__()
        self.body = body
        self.logit_bias = float(logit_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C, h, w) -> logits (B, K)."""
        return self.body(features).mean(dim=(2, 3)) + self.logit_bias


def default_logit_bias(loss: str, num_classes: int) -> float:
    """-log(C - 1) for BCE probes, so that initial sigmoid outputs are about 1/C; 0 for CE."""
    return -math.log(num_classes - 1) if loss == "bce" else 0.0


def _conv1x1(cin: int, cout: int, std: float | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=1)
    if std is not None:
        nn.init.normal_(conv.weight, std=std)
        nn.init.zeros_(conv.bias)
    return conv


@HEADS.register("linear")
def linear(in_channels: int, num_classes: int, logit_bias: float = 0.0) -> Head:
    """One 1x1 convolution with N(0, 0.01) weights: a linear probe."""
    return Head(_conv1x1(in_channels, num_classes, std=0.01), logit_bias)


@HEADS.register("mlp")
def mlp(in_channels: int, num_classes: int, depth: int = 2, width: int = 2048, logit_bias: float = 0.0) -> Head:
    """Conventional MLP of ``depth`` layers: ``fc -> BN -> [ReLU -> fc -> BN] x (depth-2) -> ReLU -> fc``."""
    if depth < 2:
        raise ValueError(f"mlp head depth must be >= 2, got {depth}")
    layers: list[nn.Module] = [_conv1x1(in_channels, width), nn.BatchNorm2d(width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), _conv1x1(width, width), nn.BatchNorm2d(width)]
    layers += [nn.ReLU(), _conv1x1(width, num_classes)]
    return Head(nn.Sequential(*layers), logit_bias)


def create_head(name: str, in_channels: int, num_classes: int, **kwargs) -> Head:
    """Build the registered head ``name``; ``kwargs`` are its options (depth, width, logit_bias)."""
    return HEADS.get(name)(in_channels, num_classes, **kwargs)


def list_heads(pattern: str = "*") -> list[str]:
    return HEADS.names(pattern)
