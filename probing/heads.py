"""Probes: classification heads trained on a frozen backbone's last feature map.

As in the reference code of "How to Probe" (Gairola et al., ICLR 2025), a head is by default
applied as 1x1 convolutions to the spatial feature map and global average pooling comes *after*
it (``input="spatial"``). For a linear head this equals a linear layer on pooled features; for MLP
and B-cos heads it does not, and it keeps final-layer attributions faithful to the head.
``input="pooled"`` pools first and applies the same layers to the (B, C, 1, 1) result.

B-cos layers and uncentred norms come from the ``bcos`` package (Böhle et al.).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from probing.registry import Registry, unknown_name

__all__ = [
    "HEADS",
    "HEAD_INPUTS",
    "MIN_DEPTH",
    "Head",
    "Pointwise",
    "create_head",
    "head_options",
    "list_heads",
    "default_logit_bias",
    "explanation_mode",
]

HEADS: Registry = Registry("head")
HEAD_INPUTS = ("spatial", "pooled")
# the fewest layers each head type can have (an MLP needs a hidden layer; a B-cos head of depth 1 is linear in form)
MIN_DEPTH = {"mlp": 2, "bcos": 1}


class Pointwise(nn.Conv2d):
    """A fully connected layer applied at every position (a 1x1 convolution). Its own type so that
    LRP gives it the rule of a linear layer (Epsilon), as zennit does to torchvision's ``fc``."""


class Head(nn.Module):
    """1x1-convolution body and global average pooling (after or before it), then a logit bias.

    Pooling is a module (``nn.AdaptiveAvgPool2d``), as in torchvision's ResNet, so that LRP applies
    its pooling rule there (REFERENCE section 4). The logit bias is a buffer: it is saved with the
    probe's state dict.

    Args:
        body (nn.Module): (B, C, h, w) -> (B, K, h, w).
        logit_bias (float): constant added to every logit after pooling.
        input (str): ``spatial`` (body, then pool) or ``pooled`` (pool, then body).
    """

    def __init__(self, body: nn.Module, logit_bias: float = 0.0, input: Literal["spatial", "pooled"] = "spatial"):
        super().__init__()
        if input not in HEAD_INPUTS:
            raise ValueError(unknown_name("head input", input, HEAD_INPUTS))
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        # float64: exact in a float64 model, and a 0-dim tensor leaves float32 logits float32
        self.register_buffer("logit_bias", torch.tensor(float(logit_bias), dtype=torch.float64))
        self.input = input
        # An affine body commutes with the mean, so pooling first gives the same logits and the
        # same gradients with h*w times less work (the spatial linear probe trains ~2x faster).
        self.pool_first = input == "pooled" or isinstance(body, nn.Conv2d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C, h, w) -> logits (B, K)."""
        if self.pool_first:
            logits = self.body(self.pool(features))
        else:
            logits = self.pool(self.body(features))
        return logits.flatten(1) + self.logit_bias


def default_logit_bias(loss: str, num_classes: int, head: str = "linear") -> float:
    """-log(C - 1) for single-label BCE and for B-cos heads (initial sigmoid outputs about 1/C), else
    0. Multi-label probes get none, for any head, as in the How to Probe code (its B-cos multi-label
    head uses ``logit_bias=0.0``)."""
    from probing.losses import create_loss

    if create_loss(loss).multilabel:
        return 0.0
    return -math.log(num_classes - 1) if loss.startswith("bce") or head == "bcos" else 0.0


def _conv1x1(cin: int, cout: int, std: float | None = None) -> Pointwise:
    conv = Pointwise(cin, cout, kernel_size=1)
    if std is not None:
        nn.init.normal_(conv.weight, std=std)
        nn.init.zeros_(conv.bias)
    return conv


@HEADS.register("linear")
def linear(in_channels: int, num_classes: int, logit_bias: float = 0.0, input: str = "spatial") -> Head:
    """One 1x1 convolution with N(0, 0.01) weights: a linear probe."""
    return Head(_conv1x1(in_channels, num_classes, std=0.01), logit_bias, input)


@HEADS.register("mlp")
def mlp(
    in_channels: int,
    num_classes: int,
    depth: int = 2,
    width: int = 2048,
    logit_bias: float = 0.0,
    input: str = "spatial",
) -> Head:
    """Conventional MLP of ``depth`` layers: ``fc -> BN -> [ReLU -> fc -> BN] x (depth-2) -> ReLU -> fc``."""
    if depth < MIN_DEPTH["mlp"]:
        raise ValueError(f"mlp head depth must be >= {MIN_DEPTH['mlp']}, got {depth}")
    layers: list[nn.Module] = [_conv1x1(in_channels, width), nn.BatchNorm2d(width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), _conv1x1(width, width), nn.BatchNorm2d(width)]
    layers += [nn.ReLU(), _conv1x1(width, num_classes)]
    return Head(nn.Sequential(*layers), logit_bias, input)


@HEADS.register("bcos")
def bcos_mlp(
    in_channels: int,
    num_classes: int,
    depth: int = 2,
    width: int = 2048,
    bcos_b: float = 2.0,
    max_out: int = 1,
    logit_bias: float = 0.0,
    input: str = "spatial",
) -> Head:
    """B-cos MLP: ``[BcosConv 1x1 -> uncentred BN without bias] x (depth-1) -> BcosConv 1x1``.

    No activation: the B-cos layer (exponent ``bcos_b``, ``max_out`` MaxOut units) is the
    non-linearity, so with the dynamic scaling detached (:func:`explanation_mode`) the head is
    dynamic linear and ``features * d logit / d features`` sums to the logit minus its bias.
    """
    from bcos.modules import BcosConv2d, BatchNormUncentered2d
    from bcos.modules.norms import NoBias

    if depth < MIN_DEPTH["bcos"]:
        raise ValueError(f"bcos head depth must be >= {MIN_DEPTH['bcos']}, got {depth}")
    if bcos_b < 1:
        raise ValueError(f"bcos head exponent bcos_b must be >= 1, got {bcos_b}")
    widths = [in_channels] + [width] * (depth - 1) + [num_classes]
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        layers.append(BcosConv2d(cin, cout, kernel_size=1, b=bcos_b, max_out=max_out))
        if i < depth - 1:
            layers.append(NoBias(BatchNormUncentered2d)(cout))
    return Head(nn.Sequential(*layers), logit_bias, input)


@contextmanager
def explanation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Detach the dynamic scaling of every B-cos module in ``model`` while inside the block.

    A model without B-cos modules is unchanged, so callers need not check.
    """
    switchable = [m for m in model.modules() if hasattr(m, "set_explanation_mode")]
    before = [getattr(m, "detach", False) for m in switchable]
    for m in switchable:
        m.set_explanation_mode(True)
    try:
        yield model
    finally:
        for m, was in zip(switchable, before):
            m.set_explanation_mode(was)


def create_head(name: str, in_channels: int, num_classes: int, **kwargs) -> Head:
    """Build the registered head ``name``; ``kwargs`` are its options (:func:`head_options`) and ``logit_bias``."""
    return HEADS.get(name)(in_channels, num_classes, **kwargs)


def head_options(name: str) -> dict[str, inspect.Parameter]:
    """The options the head ``name`` takes, read from its builder's signature: what a sweep spec may
    set under ``probe.head`` besides ``type`` (``depth``, ``width``, ``bcos_b``, ``max_out``, ``input``)."""
    parameters = inspect.signature(HEADS.get(name)).parameters
    return {k: p for k, p in parameters.items() if k not in ("in_channels", "num_classes", "logit_bias")}


def list_heads(pattern: str = "*") -> list[str]:
    return HEADS.names(pattern)
