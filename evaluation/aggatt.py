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

from evaluation.panels import Panel, heat_rgb, overlay_rgb, panel_figure

__all__ = [
    "AGGATT_PERCENTILES", "AggAtt", "aggatt_bins", "aggatt_figure", "comparison_figure", "heatmap_gallery", "load_aggatt",
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


def _bin_panels(aggatt: AggAtt, grid: int | None) -> list[Panel]:
    """A panel per bin on the scale [0, vmax] with the grid's cells outlined; "no maps" where a
    bin is empty (not a black square)."""
    return [Panel(heat_rgb(image.float().cpu().numpy(), aggatt.vmax), cells=grid) if count else Panel(note="no maps")
            for image, count in zip(aggatt.maps, aggatt.counts)]  # fmt: skip


def aggatt_figure(aggatt: AggAtt, title: str = "", grid: int | None = None):
    """A matplotlib figure: one panel per bin on one colour scale [0, vmax] with its colour bar; a
    bin with no maps is an empty, labelled panel; ``grid``: outline the cells of a ``grid`` x
    ``grid`` grid image."""
    titles = [f"{label}\n({count} maps)" for label, count in zip(aggatt.labels, aggatt.counts)]
    scale = ("mean positive attribution", aggatt.vmax) if any(aggatt.counts) else None
    return panel_figure([_bin_panels(aggatt, grid)], column_titles=titles, title=title, colorbar=scale, panel_inches=1.7)


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
    shown = probes[:max_probes]
    holders = Counter(i for _, examples in shown for i in set(examples["ids"].tolist()))
    chosen = sorted((i for i, n in holders.items() if n > 1), key=lambda i: (-holders[i], i))[:rows]
    if not chosen:
        return None
    columns = []
    for _, examples in shown:
        where = {int(i): k for k, i in enumerate(examples["ids"].tolist())}
        columns.append([_example_panel(examples["images"][where[e]], examples["maps"][where[e]], examples["scores"][where[e]])
                        if e in where else Panel(note="not among\nits examples") for e in chosen])  # fmt: skip
    return panel_figure([list(row) for row in zip(*columns)], column_titles=[_column_title(n) for n, _ in shown],
                        row_labels=[f"#{e}" for e in chosen], title=(title or "examples") + ": the same examples, a column per probe")  # fmt: skip


def load_aggatt(path) -> AggAtt:
    """Bins stored by :func:`save_aggatt`."""
    import numpy as np

    with np.load(path, allow_pickle=False) as stored:
        return AggAtt(torch.from_numpy(stored["maps"].astype(np.float32)), stored["counts"].tolist(), stored["labels"].tolist(), float(stored["vmax"]))


def comparison_figure(probes: list[tuple[str, AggAtt]], title: str = "", grid: int | None = None, max_probes: int = 24):
    """Several probes' AggAtt side by side: a column per probe (in the given order, the first
    ``max_probes``), a row per bin, each column on its own probe's scale (its bins' 99.5th
    percentile is 1), so that where the attribution goes is compared, not its size."""
    shown = probes[:max_probes]
    columns = [_bin_panels(aggatt, grid) for _, aggatt in shown]
    labels = max((a.labels for _, a in shown), key=len)
    left_out = f" (the first {max_probes} of {len(probes)} probes)" if len(probes) > max_probes else ""
    blank = Panel()  # a probe with fewer bins than another
    return panel_figure(
        [[column[r] if r < len(column) else blank for column in columns] for r in range(len(labels))],
        column_titles=[_column_title(name) for name, _ in shown], row_labels=labels,
        title=(title or "AggAtt") + left_out + ": best to worst localised, top to bottom",
        colorbar=("attribution / the probe's 99.5th pct.", 1.0),
    )  # fmt: skip


def _example_panel(image: torch.Tensor, heat: torch.Tensor, score) -> Panel:
    """An image with its positive attribution over it (on the map's own scale, clipped at its
    99.5th percentile) and its score under it."""
    positive = heat.clamp(min=0).double()
    top = float(torch.quantile(positive.flatten(), CLIP_PERCENTILE / 100)) or 1e-12
    picture = image.permute(1, 2, 0).float().cpu().numpy()
    return Panel(overlay_rgb(picture, (positive / top).clamp(max=1).cpu().numpy()), caption=f"score {float(score):.2f}")


def heatmap_gallery(images: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor, title: str = "", columns: int = 4):
    """A matplotlib figure of example explanations: each image with its positive attribution
    overlaid (own colour scale per map, clipped at its 99.5th percentile) and its score.

    Args:
        images (Tensor): (N, 3, H, W) in [0, 1]. maps (Tensor): (N, H, W). scores (Tensor): (N,).
    """
    panels = [_example_panel(image, heat, score) for image, heat, score in zip(images, maps, scores)]
    panels += [Panel()] * (-len(panels) % columns if panels else columns)  # blank up to a whole row
    return panel_figure([panels[k : k + columns] for k in range(0, len(panels), columns)], title=title)
