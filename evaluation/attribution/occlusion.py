"""Occlusion (Zeiler & Fergus, 2014): how much the target logit drops when a window is zeroed.

A ``window`` x ``window`` patch (all channels) slides with ``stride`` over the activation at the
layer (ML-Att: at an inner layer the activation is occluded); each position's map value is the
mean drop over the windows that cover it, as captum's ``Occlusion`` with a zero baseline computes.
All windows of all rows run batched, ``internal_batch_size`` rows per forward pass.
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import layer_activation, select_targets, to_image_size

__all__ = ["occlusion"]


def _starts(size: int, window: int, stride: int) -> list[int]:
    return list(range(0, size - window + 1, stride))


@torch.no_grad()
def occlusion(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    window: int | None = None,
    stride: int | None = None,
    internal_batch_size: int = 256,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Occlusion maps (B, H, W).

    Args:
        window (int): side of the occluding patch, in pixels of the layer. Default: a quarter of
            the map's side (at least 1). stride (int): default half the window (at least 1).
    """
    activation = layer_activation(model, images, layer, activation)
    batch, _, height, width = activation.shape
    window = window or max(1, min(height, width) // 4)
    stride = stride or max(1, window // 2)
    full = select_targets(model.forward_from(activation, layer), targets)
    positions = [(y, x) for y in _starts(height, window, stride) for x in _starts(width, window, stride)]
    drops = torch.zeros(batch, height, width, dtype=activation.dtype, device=activation.device)
    counts = torch.zeros(height, width, dtype=activation.dtype, device=activation.device)
    for y, x in positions:
        counts[y : y + window, x : x + window] += 1
    per_pass = max(1, internal_batch_size // batch)
    for start in range(0, len(positions), per_pass):
        chunk = positions[start : start + per_pass]
        occluded = activation.repeat(len(chunk), 1, 1, 1)
        for i, (y, x) in enumerate(chunk):
            occluded[i * batch : (i + 1) * batch, :, y : y + window, x : x + window] = 0
        scores = select_targets(model.forward_from(occluded, layer), targets.repeat(len(chunk)))
        for i, (y, x) in enumerate(chunk):
            drops[:, y : y + window, x : x + window] += (full - scores[i * batch : (i + 1) * batch])[:, None, None]
    return to_image_size(drops / counts.clamp(min=1), images.shape[-2:])
