"""Attention-based explanations of vision transformers: attention rollout (Abnar & Zuidema, 2020)
and Chefer et al.'s gradient-weighted attention rule (ICCV 2021, "Generic Attention-model
Explainability"; called CGW2 by Böhle et al., beside CGW1, their CVPR 2021 rule that weights LRP
relevances of the attention instead of the attention itself: ``cgw1`` in
:mod:`evaluation.attribution.attention_lrp`).

Both propagate a token-to-token relevance ``R`` (identity at the start) through the blocks:

- rollout: ``R <- A_hat R`` with ``A_hat`` the heads' mean attention plus the identity (the
  residual), rows normalised: ``A_hat = (0.5 A + 0.5 I)`` / row sums (:func:`rolled_out`).
  Class-agnostic.
- gradient-weighted (``attention_grad``): ``R <- R + mean_h (dlogit/dA * A)+ R``, the target
  logit's gradient with respect to each attention matrix.

The map is the relevance of the patch tokens for the tokens the head reads: probesweep's probes
pool the patch tokens (the class token is dropped, ``probing.zoo.ViTPatchMap``), so it is the
mean of the patch tokens' rows of ``R`` (a class-token model would read row 0). It is defined at
the input only (patches upsampled bilinearly to the image). The attention is computed by
hand inside ``nn.MultiheadAttention`` while a method runs (same output, probabilities kept),
and the modules are left as they were.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attribution.common import attribution_method, repeated_rows, select_targets, to_image_size

__all__ = ["attention_gradient", "attention_rollout", "patch_map", "recorded_attention", "rolled_out"]

VIT_ONLY = (("vit", "it reads the attention of a vision transformer's blocks"),)


def explicit_attention(
    module: nn.MultiheadAttention, x: torch.Tensor, detach_probabilities: bool = False, leaves: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``x`` (B, T, D) as ``module`` computes it (batch first, eval mode), and
    its probabilities (B, heads, T, T); ``detach_probabilities``: the output's gradient flows
    through the values only (CP-LRP's rule). ``leaves``: the output is computed from a detached
    copy of the probabilities that requires a gradient, appended there (the gradient that reaches
    the probabilities, which flows no further)."""
    batch, tokens, dim = x.shape
    heads = module.num_heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    used = probs.detach() if detach_probabilities or leaves is not None else probs
    if leaves is not None:
        used = used.requires_grad_(True)
        leaves.append(used)
    out = (used @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return module.out_proj(out), probs


@contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every batch-first ``nn.MultiheadAttention`` of ``model`` computes its
    self-attention by hand and appends its probabilities (in the autograd graph) to the yielded
    list, in call order. Each module's own ``forward`` is back on exit, also on an error."""
    records: list[torch.Tensor] = []
    patched = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not patched:
        raise ValueError("the model has no nn.MultiheadAttention: attention methods explain vision transformers")
    for module in patched:
        if not module.batch_first:
            raise ValueError("attention methods expect batch-first nn.MultiheadAttention (torchvision's ViT)")

        def forward(query, key, value, *args, _module=module, **kwargs):
            out, probs = explicit_attention(_module, query)
            records.append(probs)
            return out, None

        module.forward = forward  # an instance attribute: deleting it restores the class's method
    try:
        yield records
    finally:
        for module in patched:
            del module.forward


def patch_map(relevance: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, T, T) token relevance -> (B, H, W): the patch tokens' mean row, over the patches."""
    patches = relevance[:, 1:, 1:].mean(dim=1)
    side = int(round(patches.shape[1] ** 0.5))
    return to_image_size(patches.reshape(len(patches), side, side), images.shape[-2:])


@attribution_method("rollout", ("input",), "attention rollout (ViTs; class-agnostic)", requires=VIT_ONLY, grid_models=False)
def attention_rollout(model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation=None) -> torch.Tensor:
    """(B, H, W) attention rollout maps; ``targets`` are checked, not used (rollout ignores the
    class), so the rows of one image (a grid's targets) share one computation."""
    k = repeated_rows(images)
    distinct = images[::k]
    with torch.no_grad(), recorded_attention(model) as records:
        select_targets(model(distinct).repeat_interleave(k, dim=0), targets)
    return patch_map(rolled_out([probs.mean(dim=1) for probs in records]), images).repeat_interleave(k, dim=0)


def rolled_out(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Rollout of per-block (B, T, T) token matrices ``M_b``: the product over the blocks of
    ``M_b + I`` (the residual) with rows normalised, the last block leftmost."""
    eye = torch.eye(matrices[0].shape[-1], dtype=matrices[0].dtype, device=matrices[0].device)
    relevance = eye.expand(len(matrices[0]), -1, -1)
    for matrix in matrices:
        mixed = matrix + eye
        relevance = (mixed / mixed.sum(dim=-1, keepdim=True)) @ relevance
    return relevance


@attribution_method("attention_grad", ("input",), "gradient-weighted attention, Chefer et al. 2021b (ViTs)", requires=VIT_ONLY, grid_models=False)
def attention_gradient(model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation=None) -> torch.Tensor:
    """(B, H, W) maps of Chefer et al.'s rule ``R <- R + mean_h (grad A * A)+ R``. Rows of one
    image (a grid's targets) share its forward pass: one backward pass per target position."""
    k = repeated_rows(images)
    distinct = images[::k]
    maps = []
    with torch.enable_grad(), recorded_attention(model) as records:
        logits = model(distinct.detach().requires_grad_(True))  # (the frozen weights need no gradient)
        select_targets(logits.repeat_interleave(k, dim=0), targets)  # checks every row's target
        for r in range(k):  # rows are independent: the sum's gradient is each row's own
            gradients = torch.autograd.grad(select_targets(logits, targets[r::k]).sum(), records, retain_graph=r < k - 1)
            relevance = torch.eye(records[0].shape[-1], dtype=images.dtype, device=images.device).expand(len(distinct), -1, -1)
            for probs, grad in zip(records, gradients):
                relevance = relevance + (grad * probs.detach()).clamp(min=0).mean(dim=1) @ relevance
            maps.append(patch_map(relevance, images))
    return torch.stack(maps, dim=1).flatten(0, 1)  # (U, k, H, W) -> rows in their order
