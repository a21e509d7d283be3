"""AggAtt (Rao et al., CVPR 2022): a whole data set's attributions at a glance.

Explained cells are sorted by their localisation score and split into percentile bins; each
bin shows the mean positive attribution map of its members, all bins on one colour scale
clipped at the 99.5th percentile so that a few extreme maps do not wash the others out.
Aggregate maps that share a target position (for instance every explanation of a grid's
top-left cell), so that the bins are comparable pixel by pixel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

__all__ = [
    "AGGATT_PERCENTILES", "AggAtt", "aggatt_bins", "aggatt_figure", "comparison_figure", "draw_bin", "heatmap_gallery", "load_aggatt",
    "save_aggatt", "save_examples", "load_examples", "examples_comparison_figure",
]

AGGATT_PERCENTILES = (0, 2, 5, 50, 95, 98, 100)
CLIP_PERCENTILE = 99.5
STORED_SIDE = 128  # pixels a side of stored bin maps (save_aggatt)


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


def aggatt_figure(aggatt: AggAtt, title: str = "", grid: int | None = None):
    """A matplotlib figure: one panel per bin on one colour scale [0, vmax] with its colour bar; a
    bin with no maps is an empty, labelled panel (not a black square); ``grid``: outline the cells
    of a ``grid`` x ``grid`` grid image."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers
    import matplotlib.pyplot as plt

    n_bins = len(aggatt.counts)
    figure, axes = plt.subplots(1, n_bins, figsize=(1.8 * n_bins + 0.8, 2.4), squeeze=False, layout="constrained")
    shown = None
    for ax, image, label, count in zip(axes[0], aggatt.maps, aggatt.labels, aggatt.counts):
        draw_bin(ax, image, aggatt.vmax, count, grid)
        ax.set_title(f"{label}\n({count} maps)", fontsize=8)
        shown = ax.images[0] if ax.images else shown
    if shown is not None:
        figure.colorbar(shown, ax=list(axes[0]), shrink=0.8, label="mean positive attribution")
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def draw_bin(ax, image: torch.Tensor, vmax: float, count: int, grid: int | None = None) -> None:
    """One AggAtt panel: the bin's mean map on the scale [0, vmax] with the grid's cells outlined,
    or "no maps" where the bin is empty."""
    ax.set_xticks([])
    ax.set_yticks([])
    if count == 0:
        ax.text(0.5, 0.5, "no maps", ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
        return
    height, width = image.shape
    ax.imshow(image.float().cpu().numpy(), cmap="inferno", vmin=0.0, vmax=max(vmax, 1e-12))
    for k in range(1, grid or 1):
        ax.axhline(k * height / grid - 0.5, color="white", linewidth=0.6, alpha=0.7)
        ax.axvline(k * width / grid - 0.5, color="white", linewidth=0.6, alpha=0.7)


def save_aggatt(aggatt: AggAtt, path, max_side: int = STORED_SIDE) -> None:
    """Store the bins as ``.npz`` (float16 maps, pooled to at most ``max_side`` pixels a side: what
    a figure panel shows), for figures that put several probes side by side."""
    import numpy as np

    maps = _pooled(aggatt.maps.float()[:, None], max_side)[:, 0]
    np.savez_compressed(path, maps=maps.numpy().astype(np.float16), counts=np.array(aggatt.counts),
                        labels=np.array(aggatt.labels), vmax=np.array(aggatt.vmax))  # fmt: skip


def _column_title(name: str) -> str:
    """A probe's name over two lines (``tiny_resnet_sup`` over ``ce-linear``): many columns fit."""
    return name.replace("-", "\n", 1)


def _pooled(batch: torch.Tensor, max_side: int) -> torch.Tensor:
    """(N, C, H, W) averaged over square blocks so that no side is over ``max_side``."""
    factor = -(-max(batch.shape[-2:]) // max_side)
    return torch.nn.functional.avg_pool2d(batch, factor, ceil_mode=True) if factor > 1 else batch


def save_examples(images: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, path, max_side: int = STORED_SIDE) -> None:
    """Store a gallery's examples as ``.npz``: images (uint8) and maps (float16) pooled to at most
    ``max_side`` pixels a side, their scores, and ``ids`` (each example's grid or row, the same
    for every probe), so that several probes' galleries can be shown on the same examples."""
    import numpy as np

    pictures = (_pooled(images.float().cpu(), max_side).clamp(0, 1) * 255).round().to(torch.uint8)
    np.savez_compressed(path, images=pictures.numpy(), maps=_pooled(maps.float().cpu()[:, None], max_side)[:, 0].numpy().astype(np.float16),
                        scores=scores.float().cpu().numpy(), ids=ids.cpu().numpy())  # fmt: skip


def load_examples(path) -> dict[str, torch.Tensor]:
    """Examples stored by :func:`save_examples`: ``images`` (N, 3, H, W) in [0, 1], ``maps``, ``scores``, ``ids``."""
    import numpy as np

    with np.load(path, allow_pickle=False) as stored:
        return {"images": torch.from_numpy(stored["images"]).float() / 255, "maps": torch.from_numpy(stored["maps"].astype(np.float32)),
                "scores": torch.from_numpy(stored["scores"]), "ids": torch.from_numpy(stored["ids"])}  # fmt: skip


def examples_comparison_figure(probes: list[tuple[str, dict[str, torch.Tensor]]], title: str = "", rows: int = 4, max_probes: int = 24):
    """Several probes' explanations of the same examples: a column per probe (the first
    ``max_probes``), a row per example (the ``rows`` held by the most probes' galleries, then by
    id; a probe whose gallery lacks one shows an empty panel saying so), each map over its image
    on its own scale with its score. None when no two probes share an example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = probes[:max_probes]
    holders = Counter(i for _, examples in shown for i in set(examples["ids"].tolist()))
    chosen = sorted((i for i, n in holders.items() if n > 1), key=lambda i: (-holders[i], i))[:rows]
    if not chosen:
        return None
    figure, axes = plt.subplots(len(chosen), len(shown), figsize=(1.7 * len(shown), 1.8 * len(chosen) + 0.6), squeeze=False, layout="constrained")
    for column, (name, examples) in enumerate(shown):
        where = {int(i): k for k, i in enumerate(examples["ids"].tolist())}
        axes[0, column].set_title(_column_title(name), fontsize=8)
        for row, example in enumerate(chosen):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(f"#{example}", fontsize=8)
            if example not in where:
                ax.text(0.5, 0.5, "not among\nits examples", ha="center", va="center", fontsize=7, color="0.4", transform=ax.transAxes)
                continue
            k = where[example]
            positive = examples["maps"][k].clamp(min=0).double()
            top = float(torch.quantile(positive.flatten(), CLIP_PERCENTILE / 100)) or 1e-12
            ax.imshow(examples["images"][k].permute(1, 2, 0).numpy())
            ax.imshow((positive / top).clamp(max=1).numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_xlabel(f"score {float(examples['scores'][k]):.2f}", fontsize=7)
    figure.suptitle((title or "examples") + ": the same examples, a column per probe", fontsize=9)
    return figure


def load_aggatt(path) -> AggAtt:
    """Bins stored by :func:`save_aggatt`."""
    import numpy as np

    with np.load(path, allow_pickle=False) as stored:
        return AggAtt(torch.from_numpy(stored["maps"].astype(np.float32)), stored["counts"].tolist(), stored["labels"].tolist(), float(stored["vmax"]))


def comparison_figure(probes: list[tuple[str, AggAtt]], title: str = "", grid: int | None = None, max_probes: int = 24):
    """Several probes' AggAtt side by side: a column per probe (in the given order, the first
    ``max_probes``), a row per bin, each column on its own probe's scale (its bins' 99.5th
    percentile is 1), so that where the attribution goes is compared, not its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = probes[:max_probes]
    n_bins = max(len(a.counts) for _, a in shown)
    figure, axes = plt.subplots(
        n_bins, len(shown), figsize=(1.5 * len(shown) + 1.4, 1.45 * n_bins + 0.9), squeeze=False, layout="constrained"
    )
    image = None
    for column, (name, aggatt) in enumerate(shown):
        axes[0, column].set_title(_column_title(name), fontsize=8)
        for row, (bin_map, label, count) in enumerate(zip(aggatt.maps, aggatt.labels, aggatt.counts)):
            draw_bin(axes[row, column], bin_map / max(aggatt.vmax, 1e-12), 1.0, count, grid)
            image = axes[row, column].images[0] if axes[row, column].images else image
            if column == 0:
                axes[row, column].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attribution / the probe's 99.5th pct.")
    left_out = f" (the first {max_probes} of {len(probes)} probes)" if len(probes) > max_probes else ""
    figure.suptitle((title or "AggAtt") + left_out + ": best to worst localised, top to bottom", fontsize=9)
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
    # constrained: the panels' titles stay clear of the images above them
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False, layout="constrained")
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
    return figure
