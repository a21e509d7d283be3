"""Smoothing of attribution maps before scoring (Rao et al., CVPR 2022; REFERENCE section 4).

Applied to the (B, H, W) maps before negatives are clamped. ``Smoothing`` is a plain value so
that a sweep spec can name it per method; :func:`smooth` is a pure function. Average pooling pads
with zeros and counts them (the reference's ``AvgPool2d(5, 1, 2)``); the Gaussian pads by
reflection, as torchvision's ``GaussianBlur`` that How to Probe uses.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from probing.registry import unknown_name

__all__ = ["NO_SMOOTHING", "SMOOTHING_KINDS", "Smoothing", "REFERENCE_SMOOTHING", "gaussian_kernel", "smooth"]


SMOOTHING_KINDS = ("none", "avgpool", "gaussian")


class Smoothing(BaseModel):
    """``kind``: ``none``, ``avgpool`` (``kernel``) or ``gaussian`` (``kernel``, ``sigma``; default
    sigma kernel / 4). The one definition of a smoothing, from the sweep spec's
    ``evaluate.smoothing`` to :func:`smooth`; ``Smoothing("avgpool", 5)`` reads as it does in papers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    kind: str
    kernel: Annotated[int, Field(ge=1)] = 5
    sigma: Annotated[float, Field(gt=0)] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(**dict(zip(("kind", "kernel", "sigma"), args)), **kwargs)

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SMOOTHING_KINDS:
            raise ValueError(unknown_name("smoothing", v, SMOOTHING_KINDS))
        return v

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd, got {v}")
        return v


NO_SMOOTHING = Smoothing("none")

# Rao et al.: a 129 px Gaussian (sigma 129/4) for IxG and IntGrad, 5x5 average pooling otherwise.
REFERENCE_SMOOTHING = {
    "ixg": Smoothing("gaussian", 129, 129 / 4),
    "intgrad": Smoothing("gaussian", 129, 129 / 4),
    "default": Smoothing("avgpool", 5),
}


def gaussian_kernel(kernel: int, sigma: float, dtype=torch.float32) -> torch.Tensor:
    """(kernel,) normalised 1-D Gaussian centred on the middle tap."""
    offsets = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (weights / weights.sum()).to(dtype)


def _reflect(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """``x`` padded by ``pad`` on both sides of ``dim`` (-1 or -2) by reflection, as ``F.pad(mode=
    "reflect")``; a pad wider than the map reflects the padded map again (torchvision raises there)."""
    while pad > 0:
        step = min(pad, x.shape[dim] - 1)
        x = F.pad(x, (step, step, 0, 0) if dim == -1 else (0, 0, step, step), mode="reflect")
        pad -= step
    return x


def smooth(maps: torch.Tensor, smoothing: Smoothing) -> torch.Tensor:
    """Smoothed (B, H, W) maps of the same size (stride 1; see the module docstring for the borders)."""
    if smoothing.kind == "none" or smoothing.kernel == 1:
        return maps
    pad = smoothing.kernel // 2
    x = maps[:, None]
    if smoothing.kind == "avgpool":
        # count_include_pad: border pixels average over zeros too, as the reference's AvgPool2d
        return F.avg_pool2d(x, smoothing.kernel, stride=1, padding=pad, count_include_pad=True)[:, 0]
    sigma = smoothing.sigma if smoothing.sigma is not None else smoothing.kernel / 4
    g = gaussian_kernel(smoothing.kernel, sigma, maps.dtype).to(maps.device)
    # separable: rows then columns
    x = F.conv2d(_reflect(x, pad, -1), g.view(1, 1, 1, -1))
    x = F.conv2d(_reflect(x, pad, -2), g.view(1, 1, -1, 1))
    return x[:, 0]
