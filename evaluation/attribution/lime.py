"""LIME (Ribeiro et al., 2016) through the ``lime`` package, with the reference settings.

Quickshift superpixels (kernel 4, max_dist 200, ratio 0.2), 500 perturbed samples in which a
hidden segment takes its own mean colour (lime's ``hide_color=None``, as How to Probe; the mean
commutes with the per-channel normalisation and with the B-cos encoding ``[x, 1 - x]``, so it is
taken of the model's input), a ridge regression per target on
the target's probability (sigmoid for BCE probes, softmax for CE probes). The map gives each
pixel its segment's weight. Rows that share an image (the targets of one grid) share its samples:
with the same ``seed`` that equals calling LIME once per target. Segmentation runs on the input
rescaled to [0, 1] per channel, which undoes any per-channel normalisation. Input layer only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from evaluation.attribution.common import attribution_method, encoded_perturbation, model_rows

__all__ = ["lime"]


def _segmenter():
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    return SegmentationAlgorithm("quickshift", kernel_size=4, max_dist=200, ratio=0.2, random_seed=0)


def _segment_means(image: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(C, H, W): every pixel replaced by the mean of its segment, per channel."""
    flat, index = image.flatten(1), segments.flatten().long()
    n = int(index.max()) + 1
    sums = torch.zeros(len(image), n, dtype=image.dtype, device=image.device).index_add_(1, index, flat)
    counts = torch.bincount(index, minlength=n).to(image.dtype)
    return (sums / counts)[:, index].view_as(image)


def _as_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) normalised input -> (H, W, 3) in [0, 1] for the segmentation (first 3 channels)."""
    rgb = image[:3].double()
    low, high = rgb.amin(dim=(1, 2), keepdim=True), rgb.amax(dim=(1, 2), keepdim=True)
    return ((rgb - low) / (high - low + 1e-12)).permute(1, 2, 0).cpu().numpy()


@attribution_method(
    "lime", ("input",), "LIME (quickshift superpixels, 500 samples, segments hidden by their mean)",
    uses_probabilities=True,
)
@torch.no_grad()
def lime(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    probabilities: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.softmax(dim=1),
    num_samples: int = 500,
    seed: int = 0,
    batch_size: int = 100,
    hide_color: float | None = None,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """LIME maps (B, H, W).

    Args:
        probabilities: logits -> probabilities (sigmoid for BCE probes, softmax for CE probes).
        num_samples (int): perturbed samples per image. Default: 500 (the reference setting).
        seed (int): lime's random state. batch_size (int): samples per forward pass.
        hide_color (float): the value of a hidden segment in the model's input. Default: None,
            each segment's own mean (the reference setting).
        activation: accepted for the shared call shape and not needed: LIME perturbs the input.
    """
    from lime.lime_image import LimeImageExplainer

    maps = torch.zeros(len(images), *images.shape[-2:], dtype=images.dtype, device=images.device)
    start = 0
    while start < len(images):  # a group: consecutive rows with the same image
        end = start + 1
        while end < len(images) and torch.equal(images[end], images[start]):
            end += 1
        rows = list(range(start, end))
        # a plain model serves every target from one pass; a grid model ties each row to its cell
        rows_per_sample = len(rows) if hasattr(model, "rows") else 1
        row_model = model_rows(model, rows)
        image = images[start]
        segments = _segmenter()(_as_rgb(image))
        seg = torch.from_numpy(segments).to(images.device)
        fill = _segment_means(image, seg)[None] if hide_color is None else float(hide_color)

        def classify(samples: np.ndarray) -> np.ndarray:
            # lime perturbs an (H, W, 3) picture; apply its segment on/off pattern to the real input
            keep = torch.from_numpy(samples[..., 0] != 0).to(images.device)  # hidden segments are 0
            batch = encoded_perturbation(model, image[None], keep[:, None].to(image.dtype), fill)
            batch = batch.repeat_interleave(rows_per_sample, dim=0)  # sample-major: the row model's cells repeat
            p = probabilities(row_model(batch)).view(len(samples), rows_per_sample, -1)
            out = p[:, 0].clone()
            for i, row in enumerate(rows[:rows_per_sample] if rows_per_sample > 1 else []):
                out[:, targets[row]] = p[:, i, targets[row]]  # each target's probability from its own row
            return out.double().cpu().numpy()

        marker = np.ones((*segments.shape, 3))  # lime hides segments of this by zeroing them
        explanation = LimeImageExplainer(random_state=seed).explain_instance(
            marker, classify, labels=[int(targets[r]) for r in rows], top_labels=None, hide_color=0,
            num_samples=num_samples, batch_size=batch_size, segmentation_fn=lambda _: segments, random_seed=seed,
        )  # fmt: skip
        for row in rows:
            weights = dict(explanation.local_exp[int(targets[row])])
            table = torch.tensor([weights.get(s, 0.0) for s in range(int(seg.max()) + 1)], dtype=images.dtype)
            maps[row] = table.to(images.device)[seg]
        start = end
    return maps
