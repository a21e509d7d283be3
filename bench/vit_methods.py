"""Attention methods on a ViT: the batched methods versus the per-image, per-target loop.

A ViT-B/16 (random weights, timing only) with a spatial linear probe explains 2x2 grids of 224 px
cells (448 px, its position embeddings interpolated to 28x28 patches). The naive loop is the
formula per image and target on the attention ``nn.MultiheadAttention`` returns itself
(``need_weights``): one forward per target for rollout, a forward and a backward per target for
the gradient-weighted rule. The batched methods (``evaluation.attribution.attention``) run one
forward per grid for all its targets (rollout: one map serves them all, it ignores the class;
attention_grad, attnlrp and cgw1: one backward pass per target; vitcx: one set of masks and masked
forwards per grid, every target read from their probabilities). Both must give the same maps.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295 \\
        .venv/bin/python bench/vit_methods.py [--grids 2]

Last line: the ratio of the method that is slowest in the naive loop.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision

from evaluation.attribution import create_method
from probing.heads import create_head
from probing.model import ProbedModel
from probing.zoo import staged_backbone

METHODS = ("rollout", "attention_grad", "attnlrp", "cgw1", "vitcx")
ROW_ALONE = ("attnlrp", "cgw1", "vitcx")  # their naive loop: the method called on each row alone


def _model() -> ProbedModel:
    torch.manual_seed(0)
    backbone = staged_backbone("vit_b_16", torchvision.models.vit_b_16().eval())
    return ProbedModel(backbone, create_head("linear", backbone.out_channels, 10)).eval().requires_grad_(False)


def _attention(model, x: torch.Tensor, target: int | None):
    """Each block's attention (1, heads, T, T) from nn.MultiheadAttention itself, and with a
    ``target`` the target logit's gradient with respect to it (via the attention output: A v)."""
    records, queries, outputs, handles = [], [], [], []
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for module in blocks:
        def before(m, args, kwargs):
            queries.append(args[0])
            return args, kwargs | {"need_weights": True, "average_attn_weights": False}

        def after(m, args, out):
            records.append(out[1].detach())
            outputs.append(out[0])

        handles += [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    try:
        with torch.set_grad_enabled(target is not None):
            logits = model(x.clone().requires_grad_(target is not None))
            if target is None:
                return records, None
            output_grads = torch.autograd.grad(logits[0, target], outputs)
    finally:
        for handle in handles:
            handle.remove()
    gradients = []
    for module, query, grad in zip(blocks, queries, output_grads):
        b, t, d = query.shape
        heads = module.num_heads
        v = F.linear(query, module.in_proj_weight[2 * d :], module.in_proj_bias[2 * d :]).reshape(b, t, heads, -1).transpose(1, 2)
        per_head = (grad @ module.out_proj.weight).reshape(b, t, heads, -1).transpose(1, 2)
        gradients.append((per_head @ v.transpose(-2, -1)).detach())
    return records, gradients


def _naive(method: str, model, x: torch.Tensor, target: int) -> torch.Tensor:
    """One image, one target: the method's formula on torch's own attention (AttnLRP, CGW1 and
    ViT-CX: the method called on that row alone; their own tests compare them with the formulas)."""
    if method in ROW_ALONE:
        return create_method(method)(model, x, torch.tensor([target]))
    attention, gradients = _attention(model, x, None if method == "rollout" else target)
    tokens = attention[0].shape[-1]
    relevance = torch.eye(tokens, dtype=x.dtype)
    for i, probs in enumerate(attention):
        if method == "rollout":
            a = (probs[0].mean(dim=0) + torch.eye(tokens, dtype=x.dtype)) / 2
            relevance = (a / a.sum(dim=-1, keepdim=True)) @ relevance
        else:
            relevance = relevance + (gradients[i][0] * probs[0]).clamp(min=0).mean(dim=0) @ relevance
    patches = relevance[1:, 1:].mean(dim=0)
    side = int(round(patches.numel() ** 0.5))
    return F.interpolate(patches.reshape(1, 1, side, side), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", type=int, default=2, help="2x2 grids of 224 px cells to explain")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = _model()
    generator = torch.Generator().manual_seed(1)
    grid_inputs = model.preprocess(torch.rand(args.grids, 3, 448, 448, generator=generator))
    targets = torch.randint(0, 10, (args.grids, 4), generator=generator)
    create_method("rollout")(model, grid_inputs[:1], targets[0, :1])  # warm-up

    rows = []
    for method in METHODS:
        start = time.perf_counter()
        naive = torch.cat([_naive(method, model, grid_inputs[g : g + 1], int(t)) for g in range(args.grids) for t in targets[g]])
        naive_s = (time.perf_counter() - start) / args.grids
        start = time.perf_counter()
        ours = create_method(method)(model, grid_inputs.repeat_interleave(4, dim=0), targets.flatten())
        ours_s = (time.perf_counter() - start) / args.grids
        difference = float((ours - naive).abs().max() / naive.abs().max())
        rows.append((method, naive_s, ours_s, naive_s / ours_s, difference))
        print(f"  {method}: naive {naive_s:.2f} s/grid, batched {ours_s:.2f} s/grid", flush=True)

    print(f"\nAttention methods per 2x2 grid (4 targets), ViT-B/16, 448 px, {args.grids} grids, "
          f"{torch.get_num_threads()} threads; baseline: the formula per image and target on nn.MultiheadAttention's weights")  # fmt: skip
    print(f"{'method':15} {'naive s/grid':>12} {'batched s/grid':>14} {'ratio':>7} {'max |diff| / max |map|':>23}")
    for method, naive_s, ours_s, ratio, difference in rows:
        print(f"{method:15} {naive_s:>12.2f} {ours_s:>14.2f} {ratio:>6.2f}x {difference:>23.1e}")
    slowest = max(rows, key=lambda r: r[1])
    print(f"attention methods, batched vs naive (slowest method): {slowest[3]:.2f}x")


if __name__ == "__main__":
    main()
