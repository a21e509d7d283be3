"""GridPG grids: n x n mosaics of confidently and correctly classified images of distinct classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridImages", "GridSet", "build_grids", "confident_mask"]


class GridImages:
    """(G, C, n*H, n*W) grid images, composed from the split's images when indexed: a batch of
    grids is in memory, never all of them (500 grids of 448 px would be 1.2 GB)."""

    def __init__(self, images, picks: torch.Tensor, grid: int):
        self.source, self.picks, self.grid = images, picks, grid  # picks: (G, n*n) image index per cell
        _, self.channels, self.height, self.width = images.shape

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.picks), self.channels, self.grid * self.height, self.grid * self.width)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index) -> torch.Tensor:
        """A slice (or index tensor) of grids -> (B, C, n*H, n*W); an int -> (C, n*H, n*W)."""
        picks = self.picks[index]
        single = picks.dim() == 1
        picks = picks.reshape(-1, self.grid * self.grid)
        n, c, h, w = self.grid, self.channels, self.height, self.width
        tiles = self.source[picks.flatten()].reshape(len(picks), n, n, c, h, w)
        grids = tiles.permute(0, 3, 1, 4, 2, 5).reshape(len(picks), c, n * h, n * w)
        return grids[0] if single else grids


@dataclass(frozen=True)
class GridSet:
    """Grids and what could not be built.

    Attributes:
        images (GridImages): (G, C, n*H, n*W) grid images, composed when indexed.
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
    if len(available) < cells:
        none = torch.zeros(0, cells, dtype=torch.int64)
        return GridSet(GridImages(images, none, grid), none, grid, int(confident.sum()), n_grids)
    grid_picks, grid_classes = [], []
    for _ in range(n_grids):
        classes = available[torch.randperm(len(available), generator=generator)[:cells]]
        picks = [pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=generator)] for c in classes]
        grid_picks.append(torch.cat(picks))
        grid_classes.append(classes)
    return GridSet(GridImages(images, torch.stack(grid_picks), grid), torch.stack(grid_classes), grid, int(confident.sum()), n_grids)
