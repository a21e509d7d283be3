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
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attribution.attention import VIT_ONLY, explicit_attention
from evaluation.attribution.common import attribution_method, repeated_rows, shared_forward_gradients

__all__ = ["attention_lrp", "lrp_rules"]

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


@contextmanager
def _patched(module: nn.Module, forward) -> Iterator[None]:
    module.forward = forward.__get__(module)  # an instance attribute: deleting it restores the class's method
    try:
        yield
    finally:
        del module.forward


@contextmanager
def lrp_rules(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s LayerNorms, GELUs and attention modules compute their outputs
    so that their gradient carries the rules of the module docstring; they are put back on exit."""
    rules = ((nn.LayerNorm, _layer_norm), (nn.GELU, _gelu), (nn.MultiheadAttention, _attention))
    with ExitStack() as stack:
        for module in model.modules():
            for kind, forward in rules:
                if type(module) is kind:
                    stack.enter_context(_patched(module, forward))
        yield model


@attribution_method(
    "attnlrp", ("input",), "LRP for ViTs, lxt's rules (AttnLRP, CP-LRP in the attention)", requires=VIT_ONLY,
    refuses=(("bcos", "B-cos layers have no rule here; use 'bcos' on B-cos heads"),),
)  # fmt: skip
def attention_lrp(model, images: torch.Tensor, targets: torch.Tensor, layer: str = "input", activation=None) -> torch.Tensor:
    """(B, H, W) relevance maps at the input: input x modified gradient of the target logit,
    summed over channels. Rows of one image share its forward pass."""
    k = 1 if hasattr(model, "rows") else repeated_rows(images)  # grid models tie each row to its cell
    with lrp_rules(model):
        gradients = shared_forward_gradients(model, images[::k], targets, k)
    return (images * gradients).sum(dim=1).detach()
