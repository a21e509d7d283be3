"""Localisation metrics: pure tensor functions (Rao et al., CVPR 2022; Böhle et al., 2021).

Every score uses only the positive part of an attribution map, ``A+ = max(A, 0)``. A map with no
positive mass to speak of (``sum A+ <= MIN_MASS``) or with a non-finite value scores 0, as in Rao
et al., so that one broken map cannot turn a mean into NaN.
"""

from __future__ import annotations

import torch

__all__ = ["energy_pointing_game", "grid_pointing_game", "pointing_game", "EPS", "MIN_MASS", "POINTING_TOLERANCE"]

EPS = 1e-12  # in the denominator, as the formulas write it
MIN_MASS = 1e-7  # total positive attribution at or below which a map scores 0 (rounding noise, not evidence)
POINTING_TOLERANCE = 15  # pixels: TorchRay's pointing game (Zhang et al., 2018)


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


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = POINTING_TOLERANCE) -> torch.Tensor:
    """Pointing-game hit of each map (Zhang et al., 2018, as TorchRay's ``PointingGame``).

    The map's maximum (the first in row-major order) hits when a mask pixel lies within
    ``tolerance`` pixels of it: ``(y - py)**2 + (x - px)**2 < tolerance**2``, TorchRay's disc.
    Pixels are those of the map, the image as the model sees it (TorchRay measures in the
    original image). A map with no positive mass or a non-finite value misses, as it scores 0
    in the other games.

    Args:
        maps (Tensor): (B, H, W) attribution maps.
        masks (Tensor): (B, H, W) bool (or 0/1) masks of the same size.
        tolerance (int): the disc's radius in pixels; 0 asks for the maximum inside the mask.

    Returns:
        Tensor: (B,) 1.0 for a hit, 0.0 for a miss.
    """
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must both be (B, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    batch, height, width = maps.shape
    peak = maps.flatten(1).nan_to_num(nan=-torch.inf).argmax(dim=1)
    py, px = (peak // width).to(maps.dtype), (peak % width).to(maps.dtype)
    ys = torch.arange(height, device=maps.device, dtype=maps.dtype)
    xs = torch.arange(width, device=maps.device, dtype=maps.dtype)
    distance = (ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2
    near = distance < max(tolerance, 0.5) ** 2  # tolerance 0: the peak pixel itself
    hit = (near & masks.bool()).flatten(1).any(dim=1).to(maps.dtype)
    valid = (maps.clamp(min=0).flatten(1).sum(dim=1) > MIN_MASS) & torch.isfinite(maps.flatten(1)).all(dim=1)
    return torch.where(valid, hit, torch.zeros_like(hit))
