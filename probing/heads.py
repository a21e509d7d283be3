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
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal

import torch
from annotated_types import Interval
from torch import nn

from probing.registry import Registry, unknown_name

__all__ = [
    "HEADS",
    "HEAD_INPUTS",
    "Head",
    "HeadOption",
    "Pointwise",
    "create_head",
    "head_options",
    "list_heads",
    "default_logit_bias",
    "explanation_mode",
]

HEADS: Registry = Registry("head")
HEAD_INPUTS = ("spatial", "pooled")
HeadInput = Literal[HEAD_INPUTS]
# A builder's options and their bounds are its signature: create_head and the sweep spec
# (sweeps.settings.HeadSpec) check them from there (head_options).
Width = Annotated[int, Interval(ge=1, le=65536)]
MaxOut = Annotated[int, Interval(ge=1)]
BcosExponent = Annotated[float, Interval(ge=1)]


def layers_at_least(fewest: int):
    """Layers of a head, at least ``fewest`` (an MLP needs a hidden layer; a B-cos head of depth 1 is linear in form)."""
    return Annotated[int, Interval(ge=fewest, le=32)]


@dataclass(frozen=True)
class HeadOption:
    """One option of a head builder, from its signature: value type, default, bounds or choices."""

    name: str
    type: type
    default: Any
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None

    def violated(self, value: Any) -> tuple[str, Any] | None:
        """The bound ``value`` breaks, e.g. ``(">=", 2)``, or ``("in", choices)``; None if it fits."""
        if self.choices is not None:
            return None if value in self.choices else ("in", self.choices)
        if self.ge is not None and value < self.ge:
            return ">=", self.ge
        if self.le is not None and value > self.le:
            return "<=", self.le
        return None


def shown(value: Any) -> str:
    """A value in an error message: ``10000000``, ``0.5``, ``'x'``."""
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _option(name: str, hint: Any, default: Any) -> HeadOption:
    bounds: dict[str, float] = {}
    if typing.get_origin(hint) is Annotated:
        hint, *metadata = typing.get_args(hint)
        for item in metadata:
            bounds |= {k: getattr(item, k) for k in ("ge", "le") if getattr(item, k, None) is not None}
    if typing.get_origin(hint) is Literal:
        return HeadOption(name, str, default, choices=typing.get_args(hint))
    return HeadOption(name, hint, default, **bounds)


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
def linear(in_channels: int, num_classes: int, logit_bias: float = 0.0, input: HeadInput = "spatial") -> Head:
    """One 1x1 convolution with N(0, 0.01) weights: a linear probe."""
    return Head(_conv1x1(in_channels, num_classes, std=0.01), logit_bias, input)


@HEADS.register("mlp")
def mlp(
    in_channels: int,
    num_classes: int,
    depth: layers_at_least(2) = 2,
    width: Width = 2048,
    logit_bias: float = 0.0,
    input: HeadInput = "spatial",
) -> Head:
    """Conventional MLP of ``depth`` layers: ``fc -> BN -> [ReLU -> fc -> BN] x (depth-2) -> ReLU -> fc``."""
    layers: list[nn.Module] = [_conv1x1(in_channels, width), nn.BatchNorm2d(width)]
    for _ in range(depth - 2):
        layers += [nn.ReLU(), _conv1x1(width, width), nn.BatchNorm2d(width)]
    layers += [nn.ReLU(), _conv1x1(width, num_classes)]
    return Head(nn.Sequential(*layers), logit_bias, input)


@HEADS.register("bcos")
def bcos_mlp(
    in_channels: int,
    num_classes: int,
    depth: layers_at_least(1) = 2,
    width: Width = 2048,
    bcos_b: BcosExponent = 2.0,
    max_out: MaxOut = 1,
    logit_bias: float = 0.0,
    input: HeadInput = "spatial",
) -> Head:
    """B-cos MLP: ``[BcosConv 1x1 -> uncentred BN without bias] x (depth-1) -> BcosConv 1x1``.

    No activation: the B-cos layer (exponent ``bcos_b``, ``max_out`` MaxOut units) is the
    non-linearity, so with the dynamic scaling detached (:func:`explanation_mode`) the head is
    dynamic linear and ``features * d logit / d features`` sums to the logit minus its bias.
    """
    from bcos.modules import BcosConv2d, BatchNormUncentered2d
    from bcos.modules.norms import NoBias

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
    """Build the registered head ``name``; ``kwargs`` are its options (:func:`head_options`, checked
    against their bounds) and ``logit_bias``."""
    options = head_options(name)
    for key, value in kwargs.items():
        broken = options[key].violated(value) if key in options else None
        if broken and broken[0] == "in":
            raise ValueError(unknown_name(f"head {key}", value, broken[1]))
        if broken:
            raise ValueError(f"{name} heads need {key} {broken[0]} {shown(broken[1])}, got {shown(value)}")
    return HEADS.get(name)(in_channels, num_classes, **kwargs)


def head_options(name: str) -> dict[str, HeadOption]:
    """The options the head ``name`` takes, read from its builder's signature (names, types,
    defaults, bounds): what a sweep spec may set under ``probe.head`` besides ``type``."""
    builder = HEADS.get(name)
    hints = typing.get_type_hints(builder, include_extras=True)
    return {
        k: _option(k, hints[k], p.default)
        for k, p in inspect.signature(builder).parameters.items()
        if k not in ("in_channels", "num_classes", "logit_bias")
    }


def list_heads(pattern: str = "*") -> list[str]:
    return HEADS.names(pattern)
