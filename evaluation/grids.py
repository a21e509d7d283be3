"""GridPG grids: n x n mosaics of images of distinct classes.

Every probe of a data set sees the same **candidate** grids: drawn by seed from the validation
images, whatever the probe (:func:`candidate_grids`). :func:`build_grids` keeps the candidates
whose every cell passes a probe's filter (:func:`confident_mask`): the evaluator explains those it
classifies correctly and takes the paper's headline over those it is also confident on. Two
probes can then be compared on the grids both explained, so that their difference is the
probes', not the draw's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridImages", "GridSet", "build_grids", "candidate_grids", "confident_mask"]


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
    """The grids a probe scores, and what could not be built.

    Attributes:
        images (GridImages): (G, C, n*H, n*W) grid images, composed when indexed.
        classes (Tensor): (G, n*n) class of each cell, row-major.
        grid (int): n.
        n_confident (int): images that passed the confidence filter.
        n_requested (int): candidate grids drawn; ``len(images)`` of them had every cell confident.
        ids (Tensor): (G,) each grid's index among the candidates (the same for every probe).
    """

    images: torch.Tensor
    classes: torch.Tensor
    grid: int
    n_confident: int
    n_requested: int
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def confident_mask(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: predicted class is the label and its probability is >= ``threshold`` (0: any
    correct top-1 prediction)."""
    top_p, top_class = probabilities.max(dim=1)
    return (top_class == labels) & (top_p >= threshold)


def candidate_grids(labels: torch.Tensor, grid: int, n_grids: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(picks, classes)``, both (n_grids, n*n): ``n_grids`` seeded candidate grids of
    ``grid**2`` distinct classes in random cells, one random image of its class in each cell.
    They depend on the labels and the seed only, so every probe of a data set draws the same.
    With fewer classes than cells there is no candidate ((0, n*n) tensors)."""
    generator = torch.Generator().manual_seed(seed)
    pools = {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
    available = torch.tensor(sorted(pools))
    cells = grid * grid
    if len(available) < cells:
        none = torch.zeros(0, cells, dtype=torch.int64)
        return none, none.clone()
    picks, classes = [], []
    for _ in range(n_grids):
        chosen = available[torch.randperm(len(available), generator=generator)[:cells]]
        picks.append(torch.cat([pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=generator)] for c in chosen]))
        classes.append(chosen)
    return torch.stack(picks), torch.stack(classes)


def build_grids(
    images: torch.Tensor, labels: torch.Tensor, confident: torch.Tensor, grid: int, n_grids: int, seed: int = 0
) -> GridSet:
    """The candidate grids (:func:`candidate_grids`) whose every cell's image is ``confident``.

    Args:
        images: (N, C, H, W), a tensor or a lazy image list (``probing.image_data.ImageFiles``).
        labels (Tensor): (N,) int64.
        confident (Tensor): (N,) bool from :func:`confident_mask`.
        n_grids: candidates drawn (the grids scored are those the probe is confident on).
    """
    picks, classes = candidate_grids(labels, grid, n_grids, seed)
    ids = confident[picks].all(dim=1).nonzero().flatten() if len(picks) else torch.zeros(0, dtype=torch.int64)
    return GridSet(GridImages(images, picks[ids], grid), classes[ids], grid, int(confident.sum()), n_grids, ids)
