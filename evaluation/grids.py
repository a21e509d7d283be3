"""GridPG grids: n x n mosaics of confidently and correctly classified images of distinct classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridSet", "build_grids", "confident_mask"]


@dataclass(frozen=True)
class GridSet:
    """Grids and what could not be built.

    Attributes:
        images (Tensor): (G, C, n*H, n*W) grid images.
        classes (Tensor): (G, n*n) class of each cell, row-major.
        grid (int): n.
        n_confident (int): images that passed the confidence filter.
        n_requested (int): grids asked for; ``n_requested - len(images)`` could not be built.
    """

    images: torch.Tensor
    classes: torch.Tensor
    grid: int
    n_confident: int
    n_requested: int

    def __len__(self) -> int:
        return len(self.images)


def confident_mask(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: predicted class is the label and its probability is >= ``threshold``."""
    top_p, top_class = probabilities.max(dim=1)
    return (top_class == labels) & (top_p >= threshold)


def build_grids(
    images: torch.Tensor, labels: torch.Tensor, confident: torch.Tensor, grid: int, n_grids: int, seed: int = 0
) -> GridSet:
    """Assemble up to ``n_grids`` grids from the confident images, seeded.

    Each grid holds ``grid**2`` distinct classes in random cells, one random confident image
    each. If fewer distinct classes than cells have a confident image, no grid can be built and
    the returned set is empty (``n_requested`` says how many were asked for).

    Args:
        images: (N, C, H, W), a tensor or a lazy image list (``probing.image_data.ImageFiles``).
        labels (Tensor): (N,) int64.
        confident (Tensor): (N,) bool from :func:`confident_mask`.
    """
    generator = torch.Generator().manual_seed(seed)
    pools = {int(c): (confident & (labels == c)).nonzero().flatten() for c in labels.unique()}
    pools = {c: idx for c, idx in pools.items() if len(idx)}
    available = torch.tensor(sorted(pools))
    cells = grid * grid
    _, channels, height, width = images.shape
    if len(available) < cells:
        empty = torch.zeros((0, channels, grid * height, grid * width))  # images may be a lazy file list
        return GridSet(empty, torch.zeros(0, cells, dtype=torch.int64), grid, int(confident.sum()), n_grids)
    grid_images, grid_classes = [], []
    for _ in range(n_grids):
        classes = available[torch.randperm(len(available), generator=generator)[:cells]]
        picks = [pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=generator)] for c in classes]
        tiles = images[torch.cat(picks)].reshape(grid, grid, channels, height, width)
        grid_images.append(tiles.permute(2, 0, 3, 1, 4).reshape(channels, grid * height, grid * width))
        grid_classes.append(classes)
    return GridSet(torch.stack(grid_images), torch.stack(grid_classes), grid, int(confident.sum()), n_grids)
