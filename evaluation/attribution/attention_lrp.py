"""LRP for vision transformers with the rules the ``lxt`` package applies to torchvision's ViT
(AttnLRP outside the attention, CP-LRP inside it: Achtibat et al., ICML 2024; Ali et al., ICML
2022), written here as input x a modified gradient, from the target logit:

- LayerNorm: the normalisation is linear, its standard deviation held constant (identity rule);
- GELU: relevance passes unchanged (identity rule: the gradient is ``gelu(x) / x``);
- attention: the probabilities are constants, so relevance flows through the values only;
- linear layers, the patch projection and the probe: the plain gradient (the z-rule, epsilon 0).

Every part then returns its output as input x modified gradient, so on a network without biases
(and zero position embeddings and class token) the map sums to the logit exactly; biases keep
their share. ``lxt`` itself is not a dependency: it requires ``transformers``, ``accelerate``,
``bitsandbytes`` and ``open_clip_torch``, and patches torch's classes for the whole process,
where this patches the explained model's modules for the call only.

The same rules give the attention's LRP relevance that Chefer et al.'s CVPR 2021 rule (CGW1,
``cgw1``) weights by the attention's gradient.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attribution.attention import VIT_ONLY, explicit_attention, patch_map, recorded_attention, rolled_out
from evaluation.attribution.common import attribution_method, repeated_rows, select_targets, shared_forward_gradients

__all__ = ["attention_lrp", "lrp_rules", "lrp_weighted_attention"]

NO_RULE_FOR_BCOS = (("bcos", "B-cos layers have no rule here; use 'bcos' on B-cos heads"),)

TINY = 1e-12


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    scale = torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + module.eps).detach()
    out = centred / scale
    return out * module.weight + module.bias if module.elementwise_affine else out


def _gelu(module: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    y = F.gelu(x, approximate=module.approximate)
    ratio = torch.where(x.abs() > TINY, y / torch.where(x.abs() > TINY, x, torch.ones_like(x)), torch.full_like(x, 0.5))
    return x * ratio.detach()  # the value gelu(x), the gradient gelu(x) / x


def _attention(module: nn.MultiheadAttention, query, key, value, *args, **kwargs):
    return explicit_attention(module, query, detach_probabilities=True)[0], None


def _attention_into(leaves: list[torch.Tensor]):
    """The CP-LRP attention rule, with the probabilities as leaves that collect their gradient."""

    def forward(module: nn.MultiheadAttention, query, key, value, *args, **kwargs):
        return explicit_attention(module, query, leaves=leaves)[0], None

    return forward


@contextmanager
def _patched(module: nn.Module, forward) -> Iterator[None]:
    module.forward = forward.__get__(module)  # an instance attribute: deleting it restores the class's method
    try:
        yield
    finally:
        del module.forward


@contextmanager
def lrp_rules(model: nn.Module, attention=_attention) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s LayerNorms, GELUs and attention modules compute their outputs
    so that their gradient carries the rules of the module docstring (``attention``: the
    attention modules' forward); they are put back on exit."""
    rules = ((nn.LayerNorm, _layer_norm), (nn.GELU, _gelu), (nn.MultiheadAttention, attention))
    with ExitStack() as stack:
        for module in model.modules():
            for kind, forward in rules:
                if type(module) is kind:
                    stack.enter_context(_patched(module, forward))
        yield model


@attribution_method(
    "attnlrp", ("input",), "LRP for ViTs, lxt's rules (AttnLRP, CP-LRP in the attention)", requires=VIT_ONLY,
    refuses=NO_RULE_FOR_BCOS,
)  # fmt: skip
def attention_lrp(model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation=None) -> torch.Tensor:
    """(B, H, W) relevance maps at the input: input x modified gradient of the target logit,
    summed over channels. Rows of one image share its forward pass."""
    k = 1 if hasattr(model, "rows") else repeated_rows(images)  # grid models tie each row to its cell
    with lrp_rules(model):
        gradients = shared_forward_gradients(model, images[::k], targets, k)
    return (images * gradients).sum(dim=1).detach()


@attribution_method(
    "cgw1", ("input",), "LRP-weighted attention gradients, Chefer et al. 2021a (CGW1; ViTs)", requires=VIT_ONLY,
    refuses=NO_RULE_FOR_BCOS, grid_models=False,
)  # fmt: skip
def lrp_weighted_attention(model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation=None) -> torch.Tensor:
    """(B, H, W) maps of Chefer et al.'s CVPR 2021 rule ("Transformer Interpretability Beyond
    Attention Visualization"), called CGW1 by Böhle et al.: per block, the target logit's plain
    gradient with respect to the attention ``A`` weights the LRP relevance of ``A``, and the heads'
    mean of the positive part is rolled out like the attention (:func:`rolled_out`):
    ``A_bar = I + mean_h (dlogit/dA * R_A)+``, rows normalised, multiplied over the blocks.

    ``R_A`` is the relevance the attention product ``A V`` passes to ``A`` under this module's
    rules, input x modified gradient, from relevance 1 at the target logit ``z`` (as theirs
    starts), and halved as Chefer et al. split a product's relevance evenly between its two
    factors: ``R_A = 0.5 A * (dz~/dA) / z`` (``z~``: the logit under the rules). The relevance
    itself flows on through the values only (CP-LRP), where Chefer et al.'s own LRP also passes it
    through the queries and keys, and linear layers take the z-rule where theirs take alpha 1,
    beta 0. Rows of one image share its two forward passes (plain and with the rules)."""
    k = repeated_rows(images)
    distinct = images[::k].detach()
    leaves: list[torch.Tensor] = []
    maps = []
    with torch.enable_grad():
        with recorded_attention(model) as records:  # (the frozen weights need no gradient: the input does)
            logits = model(distinct.clone().requires_grad_(True))
        with lrp_rules(model, _attention_into(leaves)):  # the leaves carry the gradient here
            relevance_logits = model(distinct)
        select_targets(logits.repeat_interleave(k, dim=0), targets)  # checks every row's target
        for r in range(k):  # rows are independent: the sum's gradient is each row's own
            chosen = targets[r::k]
            gradients = torch.autograd.grad(select_targets(logits, chosen).sum(), records, retain_graph=r < k - 1)
            chosen_logits = select_targets(relevance_logits, chosen)
            lrp_gradients = torch.autograd.grad(chosen_logits.sum(), leaves, retain_graph=r < k - 1)
            # relevance 1 at the target, as Chefer et al. start: the z-rule's relevance over the logit
            z = chosen_logits.detach()
            unit = 1 / torch.where(z < 0, z - TINY, z + TINY)
            weighted = [
                (gradient * 0.5 * leaf.detach() * lrp_gradient * unit.view(-1, 1, 1, 1)).clamp(min=0).mean(dim=1)
                for gradient, leaf, lrp_gradient in zip(gradients, leaves, lrp_gradients)
            ]  # fmt: skip
            maps.append(patch_map(rolled_out(weighted), images))
    return torch.stack(maps, dim=1).flatten(0, 1)  # (U, k, H, W) -> rows in their order
