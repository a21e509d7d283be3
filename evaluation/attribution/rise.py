"""RISE (Petsiuk et al., BMVC 2018, https://arxiv.org/abs/1806.07421), batched over masks.

``map_t = 1 / (N p) * sum_i p_t(x * M_i) M_i``: N random masks, each a ``cells x cells`` grid of
cells kept with probability p, upsampled bilinearly to ``(cells + 1)`` cell sizes and cropped at
a random shift (:func:`rise_masks`), weighted by the target's probability of the masked input
(sigmoid for BCE probes, softmax for CE probes). Defined at the input only. The masks are drawn by
``seed`` in fixed blocks, so that every image, target, batch size and run gets the same ones.
On B-cos models the image x is masked and re-encoded as ``[x, 1 - x]``. Rows that repeat one
image (the targets of one grid) share its masked forwards on models that treat all rows alike.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from evaluation.attribution.common import attribution_method, encoded_perturbation, model_rows, repeated_rows

__all__ = ["rise", "rise_masks"]

MASK_BLOCK = 32  # masks drawn per seeded block


def rise_masks(
    n_masks: int, size: tuple[int, int], cells: int = 7, keep_probability: float = 0.5, seed: int = 0, first: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n_masks, 1, H, W) RISE masks ``first .. first + n_masks - 1`` of the seeded sequence."""
    if not 0 < keep_probability <= 1 or cells < 1:
        raise ValueError(f"RISE needs 0 < keep_probability <= 1 and cells >= 1, got {keep_probability} and {cells}")
    height, width = size
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    out = []
    for block in range(first // MASK_BLOCK, (first + n_masks - 1) // MASK_BLOCK + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        grid = (torch.rand(MASK_BLOCK, 1, cells, cells, generator=generator) < keep_probability).to(dtype)
        up = F.interpolate(grid, size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear", align_corners=False)
        dy = torch.randint(0, cell_h, (MASK_BLOCK,), generator=generator)
        dx = torch.randint(0, cell_w, (MASK_BLOCK,), generator=generator)
        masks = torch.stack([up[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(MASK_BLOCK)])
        lo = max(first, block * MASK_BLOCK) - block * MASK_BLOCK
        hi = min(first + n_masks, (block + 1) * MASK_BLOCK) - block * MASK_BLOCK
        out.append(masks[lo:hi])
    return torch.cat(out)


@attribution_method("rise", ("input",), "RISE (seeded random masks)", uses_probabilities=True)
@torch.no_grad()
def rise(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    probabilities: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.softmax(dim=1),
    n_masks: int = 4000,
    cells: int = 7,
    keep_probability: float = 0.5,
    seed: int = 0,
    internal_batch_size: int = 256,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """RISE maps (B, H, W) at the input.

    Args:
        probabilities: logits -> probabilities (sigmoid for BCE probes, softmax for CE probes).
        n_masks (int): N (the paper: 4000 on ImageNet). cells (int): the mask grid (7).
        keep_probability (float): p (0.5). seed (int): the masks' seed.
        internal_batch_size (int): about this many masked inputs per forward pass.
        activation: unused (RISE perturbs the input), accepted for the shared call shape.
    """
    if n_masks < 1:
        raise ValueError(f"RISE needs n_masks >= 1, got {n_masks}")
    k = 1 if hasattr(model, "rows") else repeated_rows(images)
    distinct = images[::k]
    maps = torch.zeros(len(images), *images.shape[-2:], dtype=images.dtype, device=images.device)
    rows_per_pass = max(1, internal_batch_size // MASK_BLOCK)
    for first in range(0, n_masks, MASK_BLOCK):
        masks = rise_masks(min(MASK_BLOCK, n_masks - first), images.shape[-2:], cells, keep_probability, seed, first, images.dtype)
        masks = masks.to(images.device)
        for start in range(0, len(distinct), rows_per_pass):
            rows = torch.arange(start, min(start + rows_per_pass, len(distinct)))
            served = (rows[:, None] * k + torch.arange(k)).flatten()
            # mask-major (mask, row), so that a row model's cells repeat in step
            keep = masks[:, None].expand(-1, len(rows), -1, -1, -1).flatten(0, 1)
            masked = encoded_perturbation(model, distinct[rows].repeat(len(masks), 1, 1, 1), keep)
            p = probabilities(model_rows(model, rows)(masked)).view(len(masks), len(rows), -1)
            wanted = targets[served].to(images.device).view(1, len(rows), k).expand(len(masks), -1, -1)
            weights = p.gather(2, wanted).reshape(len(masks), len(served))  # (masks, served rows)
            maps[served] += torch.einsum("mr,mhw->rhw", weights, masks[:, 0])
    return maps / (n_masks * keep_probability)
