"""ViT-CX (Xie et al., IJCAI 2023, "ViT-CX: Causal Explanation of Vision Transformers",
https://arxiv.org/abs/2211.03064), batched over masks.

The masks come from the ViT itself: the patch tokens entering the last block's attention (after
its first LayerNorm, the reference's ``blocks[-1].norm1``), one (h, w) map per embedding
dimension, upsampled bilinearly to the image and min-max scaled. Maps closer than
``distance_threshold`` in cosine distance are merged by complete-linkage agglomerative clustering
(a cluster's mask: its maps' sum, min-max scaled; clusters ordered by their first map). Each mask
``M_i`` gets the causal score
``s_i = p_t(x M_i + e_i (1 - M_i)) - p_t(x + e_i (1 - M_i)) + p_t(x)`` with Gaussian noise
``e_i`` (std ``noise``: 0.1), and the map is ``sum_i s_i M_i / sum_j M_j / N`` (the reference's
correction of the pixels' coverage). ``p`` is the probe's probability function (sigmoid for BCE
probes, softmax for CE probes). The noise of mask i is drawn from ``seed`` and i alone, so that
every image, target and batch size gets the same. The rows of one image (a grid's targets) share
its masks and masked forwards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attribution.attention import VIT_ONLY
from evaluation.attribution.common import attribution_method, repeated_rows, select_targets

__all__ = ["vit_cx", "vit_cx_masks"]


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """(N, P) rows scaled to [0, 1]; a constant row becomes 0 (the reference would divide by 0)."""
    low, high = maps.min(dim=1, keepdim=True).values, maps.max(dim=1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(maps))


def _upsampling(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): 1-D linear upsampling (align_corners False) as a matrix; 2-D bilinear
    upsampling of X is ``W_y X W_x^T``."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)
    return F.interpolate(eye[:, None], size=n_out, mode="linear", align_corners=False)[:, 0].T


def _upsampled(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def vit_cx_masks(patch_tokens: torch.Tensor, size: tuple[int, int], distance_threshold: float = 0.1, chunk: int = 64) -> torch.Tensor:
    """(P, D) patch tokens of one image -> (N, H, W) ViT-CX masks (N clusters of the D maps).

    The maps' cosine similarities at full size come from the patch grid, since bilinear upsampling
    is linear: ``<U_i, U_j> = x_i (K_y kron K_x) x_j`` with ``K = W^T W``, so that no (D, H W)
    matrix is multiplied (ViT-B at 448 px: 768 maps of 200,704 pixels); only the maps' minima and
    maxima are taken at full size, ``chunk`` maps at a time."""
    from sklearn.cluster import AgglomerativeClustering

    side = int(round(patch_tokens.shape[0] ** 0.5))
    grid = patch_tokens.T.reshape(-1, side, side)  # (D, h, w)
    extremes = [torch.aminmax(_upsampled(grid[i : i + chunk], size).flatten(1), dim=1) for i in range(0, len(grid), chunk)]
    low, high = torch.cat([e.min for e in extremes]), torch.cat([e.max for e in extremes])
    span = high - low
    scale = torch.where(span > 0, 1 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    offset = -low * scale  # mask_i = scale_i U_i + offset_i (0 for a constant map)
    w_y, w_x = _upsampling(side, size[0], grid), _upsampling(side, size[1], grid)
    flat = grid.flatten(1)
    gram = flat @ torch.kron(w_y.T @ w_y, w_x.T @ w_x) @ flat.T  # <U_i, U_j>
    sums = flat @ torch.kron(w_y.sum(dim=0), w_x.sum(dim=0))  # sum of U_i
    pixels = size[0] * size[1]
    dots = (scale[:, None] * scale[None] * gram + scale[:, None] * offset[None] * sums[:, None]
            + offset[:, None] * scale[None] * sums[None] + offset[:, None] * offset[None] * pixels)  # fmt: skip
    norms = dots.diagonal().clamp(min=0).sqrt()
    similarity = torch.nan_to_num(dots / (norms[:, None] * norms[None]), nan=0.0, posinf=0.0, neginf=0.0)
    distance = (1 - similarity).clamp(min=0).double().cpu().numpy()
    np.fill_diagonal(distance, 0.0)
    labels = AgglomerativeClustering(
        n_clusters=None, distance_threshold=distance_threshold, metric="precomputed", linkage="complete"
    ).fit(distance).labels_
    # clusters in the order of their first map, so that mask i (and its noise) is the same whatever
    # numbers the clustering gives them; a cluster's sum of masks is linear in its maps
    order = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
    members = torch.zeros(len(order), len(grid), dtype=grid.dtype, device=grid.device)
    members[torch.tensor([order[label] for label in labels.tolist()]), torch.arange(len(grid))] = 1
    clusters = _upsampled(((members * scale) @ flat).reshape(-1, side, side), size).flatten(1) + (members @ offset)[:, None]
    return _min_max(clusters).reshape(-1, *size)


def _last_attention_input(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) tokens entering the last ``nn.MultiheadAttention`` of ``model`` for ``images``,
    and the logits."""
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    seen: list[torch.Tensor] = []
    handle = attentions[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return seen[-1], logits


@attribution_method(
    "vitcx", ("input",), "ViT-CX: causal scores of masks from the ViT's patch embeddings (ViTs)", uses_probabilities=True,
    requires=VIT_ONLY, grid_models=False,
)  # fmt: skip
@torch.no_grad()
def vit_cx(
    model,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str = "input",
    probabilities: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.softmax(dim=1),
    distance_threshold: float = 0.1,
    noise: float = 0.1,
    seed: int = 0,
    internal_batch_size: int = 64,
    activation: torch.Tensor | None = None,
) -> torch.Tensor:
    """ViT-CX maps (B, H, W) at the input.

    Args:
        probabilities: logits -> probabilities (sigmoid for BCE probes, softmax for CE probes).
        distance_threshold (float): cosine distance below which maps merge (the reference: 0.1).
        noise (float): the Gaussian noise's standard deviation (0.1). seed (int): the noise's seed.
        internal_batch_size (int): masked inputs per forward pass.
        activation: unused (ViT-CX perturbs the input), accepted for the shared call shape.
    """
    if not 0 <= distance_threshold <= 2 or noise < 0:
        raise ValueError(f"ViT-CX needs 0 <= distance_threshold <= 2 and noise >= 0, got {distance_threshold} and {noise}")
    k = repeated_rows(images)
    distinct = images[::k]
    tokens, logits = _last_attention_input(model, distinct)
    select_targets(logits.repeat_interleave(k, dim=0), targets)  # checks every row's target
    clean = probabilities(logits)
    size = tuple(images.shape[-2:])
    maps = []
    for u in range(len(distinct)):
        wanted = targets[u * k : (u + 1) * k].to(images.device)
        masks = vit_cx_masks(tokens[u, 1:], size, distance_threshold).to(images.dtype)  # the class token left out
        scores = []
        for start in range(0, len(masks), internal_batch_size):
            keep = masks[start : start + internal_batch_size, None]
            e = torch.stack([
                torch.randn(distinct.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + i), dtype=images.dtype)
                for i in range(start, start + len(keep))
            ]).to(images.device) * noise * (1 - keep)  # fmt: skip
            both = torch.cat([distinct[u] * keep + e, distinct[u] + e])
            p = probabilities(model(both))[:, wanted]
            scores.append(p[: len(keep)] - p[len(keep) :] + clean[u, wanted])
        scores = torch.cat(scores)  # (N, k)
        coverage = masks.sum(dim=0)
        shares = masks / torch.where(coverage > 0, coverage, torch.ones_like(coverage))
        maps.append(torch.einsum("nk,nhw->khw", scores, shares) / len(masks))
    return torch.cat(maps)
