"""Where a trial computes: the device Ray assigned, and the precision of feature extraction.

Ray gives a trial its GPUs by setting ``CUDA_VISIBLE_DEVICES`` (an empty list for a trial without
GPUs; a fractional GPU, ``gpu: 0.25``, is one device the trials share), so inside a trial
``torch.cuda.is_available()`` says whether it was given one, and ``cuda`` is its first GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Literal

import torch
from torch import nn

__all__ = [
    "DEVICE_SETTINGS", "PRECISIONS", "Precision", "check_placement", "exact_float32", "extraction_autocast", "trial_device",
]  # fmt: skip

DEVICE_SETTINGS = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "bfloat16", "float16")
Precision = Literal[PRECISIONS]


def trial_device(setting: str) -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else the CPU; ``cpu``; ``cuda`` (an error
    naming what this process sees when it has no GPU, instead of a silent CPU run)."""
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"train.device: {setting!r} is not one of {', '.join(DEVICE_SETTINGS)}")
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if setting == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = "CUDA_VISIBLE_DEVICES is unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}"
        raise RuntimeError(
            f"train.device is cuda but this trial sees no GPU ({seen}; {build}): give trials GPUs with "
            "resources.gpu, or set train.device: auto"
        )
    return torch.device("cpu")


def check_placement(module: nn.Module, device: torch.device, what: str) -> None:
    """Every parameter and buffer of ``module`` is on ``device``: a mixed placement is an error
    that names the first tensor elsewhere, not a slow copy on every batch."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
            raise RuntimeError(f"{what} is on {device} except {name}, on {tensor.device}: a model must be on one device")


def extraction_autocast(device: torch.device, precision: str):
    """Autocast for a frozen backbone's forward pass (``features.precision``); float32: none."""
    if precision not in PRECISIONS:
        raise ValueError(f"features.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 inside: cuDNN's convolutions run in TF32 (a 10-bit mantissa) on Ampere and newer GPUs
    by default, so attributions would not be the float32 maps the CPU gives. The flags are put back
    as they were, also when the block raises; on the CPU they change nothing."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
