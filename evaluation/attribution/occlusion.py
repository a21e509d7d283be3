"""Occlusion (Zeiler & Fergus, 2014): how much the target logit drops when a window is zeroed.

A ``window`` x ``window`` patch (all channels) slides with ``stride`` over the activation at the
layer (ML-Att: at an inner layer the activation is occluded); each position's map value is the
mean drop over the windows that cover it, as captum's ``Occlusion`` with a zero baseline computes.
All windows of all rows run batched, ``internal_batch_size`` rows per forward pass.

Windows are fixed sizes, as in Rao et al.'s code: 16 px with stride 8 at the input and the middle
layer, 5 with stride 2 at the final layer (How to Probe uses 56/28 at the input of 448 px grids:
``window=56, stride=28``). A window larger than the map is clamped to the map. On B-cos models the
image x is occluded (set to 0) and re-encoded as ``[x, 1 - x]``.
"""

from __future__ import annotations

import torch

from evaluation.attribution.common import ALL_LAYERS, attribution_method, encoded_perturbation, layer_activation, select_targets, to_image_size

#: (window, stride) per layer when none is given (Rao et al.)
DEFAULT_WINDOWS = {"input": (16, 8), "middle": (16, 8), "final": (5, 2)}

__all__ = ["occlusion"]


def _starts(size: int, window: int, stride: int) -> list[int]:
    return list(range(0, size - window + 1, stride))


@attribution_method("occlusion", ALL_LAYERS, "Occlusion (zero windows: 16/8 px, 5/2 at the final layer)")
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
        window (int): side of the occluding patch, in pixels of the layer. Default: 16 at the input
            and middle layer, 5 at the final layer (:data:`DEFAULT_WINDOWS`); at most the map's side.
        stride (int): Default: 8, or 2 at the final layer (and at most the window).
    """
    activation = layer_activation(model, images, layer, activation)
    batch, _, height, width = activation.shape
    default_window, default_stride = DEFAULT_WINDOWS.get(layer, DEFAULT_WINDOWS["input"])
    window = min(window or default_window, height, width)
    stride = min(stride or default_stride, window)
    full = select_targets(model.forward_from(activation, layer), targets)
    positions = [(y, x) for y in _starts(height, window, stride) for x in _starts(width, window, stride)]
    drops = torch.zeros(batch, height, width, dtype=activation.dtype, device=activation.device)
    counts = torch.zeros(height, width, dtype=activation.dtype, device=activation.device)
    for y, x in positions:
        counts[y : y + window, x : x + window] += 1
    per_pass = max(1, internal_batch_size // batch)
    for start in range(0, len(positions), per_pass):
        chunk = positions[start : start + per_pass]
        keep = torch.ones(len(chunk) * batch, 1, height, width, dtype=activation.dtype, device=activation.device)
        for i, (y, x) in enumerate(chunk):
            keep[i * batch : (i + 1) * batch, :, y : y + window, x : x + window] = 0
        occluded = activation.repeat(len(chunk), 1, 1, 1)
        # at the input of a B-cos model the image is occluded and re-encoded; activations are zeroed
        occluded = encoded_perturbation(model, occluded, keep) if layer == "input" else occluded * keep
        scores = select_targets(model.forward_from(occluded, layer), targets.repeat(len(chunk)))
        for i, (y, x) in enumerate(chunk):
            drops[:, y : y + window, x : x + window] += (full - scores[i * batch : (i + 1) * batch])[:, None, None]
    return to_image_size(drops / counts.clamp(min=1), images.shape[-2:])
