"""AggAtt (Rao et al., CVPR 2022): a whole data set's attributions at a glance.

Explained cells are sorted by their localisation score and split into percentile bins; each
bin shows the mean positive attribution map of its members, all bins on one colour scale
clipped at the 99.5th percentile so that a few extreme maps do not wash the others out.
Aggregate maps that share a target position (for instance every explanation of a grid's
top-left cell), so that the bins are comparable pixel by pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AGGATT_PERCENTILES", "AggAtt", "aggatt_bins", "aggatt_figure"]

AGGATT_PERCENTILES = (0, 2, 5, 50, 95, 98, 100)
CLIP_PERCENTILE = 99.5


@dataclass(frozen=True)
class AggAtt:
    """Bins from best to worst localisation.

    Attributes:
        maps (Tensor): (n_bins, H, W) mean positive attribution of each bin (zeros if empty).
        counts (list[int]): members per bin.
        labels (list[str]): ``"0-2%"``, ``"2-5%"``, ... (0% = the best scores).
        vmax (float): the shared colour scale's upper end (99.5th percentile of the bin maps).
    """

    maps: torch.Tensor
    counts: list[int]
    labels: list[str]
    vmax: float


def aggatt_bins(maps: torch.Tensor, scores: torch.Tensor, percentiles=AGGATT_PERCENTILES) -> AggAtt:
    """Sort (N, H, W) ``maps`` by ``scores`` (N,), best first, and average ``max(map, 0)`` per bin.

    Bin i holds the maps ranked in ``[p_i, p_{i+1})`` percent of N (the last bin includes N).
    """
    if maps.dim() != 3 or scores.shape != maps.shape[:1]:
        raise ValueError(f"need maps (N, H, W) and scores (N,), got {tuple(maps.shape)} and {tuple(scores.shape)}")
    n = len(maps)
    order = torch.argsort(scores, descending=True, stable=True)
    positive = maps.clamp(min=0)[order]
    bounds = [round(p * n / 100) for p in percentiles]
    bins, counts = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = positive[lo:hi]
        bins.append(members.mean(dim=0) if len(members) else torch.zeros_like(maps[0]))
        counts.append(hi - lo)
    stacked = torch.stack(bins)
    vmax = float(torch.quantile(stacked.flatten().double(), CLIP_PERCENTILE / 100)) if stacked.numel() else 0.0
    labels = [f"{a}-{b}%" for a, b in zip(percentiles[:-1], percentiles[1:])]
    return AggAtt(stacked, counts, labels, vmax)


def aggatt_figure(aggatt: AggAtt, title: str = ""):
    """A matplotlib figure: one panel per bin, one colour scale [0, vmax]."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers
    import matplotlib.pyplot as plt

    n_bins = len(aggatt.counts)
    figure, axes = plt.subplots(1, n_bins, figsize=(1.8 * n_bins, 2.2), squeeze=False)
    for ax, image, label, count in zip(axes[0], aggatt.maps, aggatt.labels, aggatt.counts):
        ax.imshow(image.cpu().numpy(), cmap="inferno", vmin=0.0, vmax=max(aggatt.vmax, 1e-12))
        ax.set_title(f"{label}\n({count})", fontsize=8)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def heatmap_gallery(images: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor, title: str = "", columns: int = 4):
    """A matplotlib figure of example explanations: each image with its positive attribution
    overlaid (own colour scale per map, clipped at its 99.5th percentile) and its score.

    Args:
        images (Tensor): (N, 3, H, W) in [0, 1]. maps (Tensor): (N, H, W). scores (Tensor): (N,).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = max(1, -(-n // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, score in zip(axes.flat, images, maps, scores):
        positive = heat.clamp(min=0).double()
        top = float(torch.quantile(positive.flatten(), CLIP_PERCENTILE / 100)) or 1e-12
        ax.imshow(image.permute(1, 2, 0).cpu().numpy())
        ax.imshow((positive / top).clamp(max=1).cpu().numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_title(f"score {float(score):.2f}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
