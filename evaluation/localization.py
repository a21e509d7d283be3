"""Localisation metrics: pure tensor functions (Rao et al., CVPR 2022; Böhle et al., 2021).

Every score uses only the positive part of an attribution map, ``A+ = max(A, 0)``. A map with no
positive mass to speak of (``sum A+ <= MIN_MASS``) or with a non-finite value scores 0, as in Rao
et al., so that one broken map cannot turn a mean into NaN.
"""

from __future__ import annotations

import torch

__all__ = ["energy_pointing_game", "grid_pointing_game", "EPS", "MIN_MASS"]

EPS = 1e-12  # in the denominator, as the formulas write it
MIN_MASS = 1e-7  # total positive attribution at or below which a map scores 0 (rounding noise, not evidence)


def _share(inside: torch.Tensor, total: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``inside / (total + eps)``, and 0 where the map has no positive mass or a non-finite value."""
    valid = (total > MIN_MASS) & torch.isfinite(maps.flatten(1)).all(dim=1)
    score = inside / (total + EPS)
    return torch.where(valid, score, torch.zeros_like(score))


def grid_pointing_game(maps: torch.Tensor, grid: int, cells: torch.Tensor) -> torch.Tensor:
    """Grid Pointing Game score of each map.

    ``score_b = sum_{cell k_b} A+_b / (sum_grid A+_b + eps)``: the share of positive attribution
    that falls inside the target cell. Uniform attribution scores ``1 / grid**2``; all positive
    mass in the target cell scores 1; an all-zero map, one with ``sum A+ <= 1e-7`` or with a NaN
    scores 0.

    Args:
        maps (Tensor): (B, H, W) attribution maps; H and W divisible by ``grid``.
        grid (int): n for an n x n grid.
        cells (Tensor): (B,) target cell index of each map, row-major (0 = top-left).

    Returns:
        Tensor: (B,) scores in [0, 1].
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    batch, height, width = maps.shape
    if height % grid or width % grid:
        raise ValueError(f"map size {height}x{width} is not divisible by grid {grid}")
    cells = torch.as_tensor(cells, device=maps.device).long()
    if cells.shape != (batch,) or (cells < 0).any() or (cells >= grid * grid).any():
        raise ValueError(f"cells must be ({batch},) indices in [0, {grid * grid}), got {cells.tolist()}")
    positive = maps.clamp(min=0)
    # (B, n, H/n, n, W/n) -> per-cell sums (B, n*n)
    per_cell = positive.reshape(batch, grid, height // grid, grid, width // grid).sum(dim=(2, 4)).flatten(1)
    inside = per_cell.gather(1, cells[:, None])[:, 0]
    return _share(inside, per_cell.sum(dim=1), maps)


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy Pointing Game score of each map (Wang et al., Score-CAM, 2020).

    ``score_b = sum(A+_b * M_b) / (sum A+_b + eps)``: the share of positive attribution inside
    the mask, for multi-label data the union of one ground-truth class's boxes (VOC: the
    non-difficult ones). An all-zero map, one with ``sum A+ <= 1e-7`` or with a NaN scores 0.

    Args:
        maps (Tensor): (B, H, W) attribution maps.
        masks (Tensor): (B, H, W) bool (or 0/1) masks of the same size.

    Returns:
        Tensor: (B,) scores in [0, 1].
    """
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must both be (B, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    positive = maps.clamp(min=0).flatten(1)
    inside = (positive * masks.flatten(1).to(positive.dtype)).sum(dim=1)
    return _share(inside, positive.sum(dim=1), maps)
