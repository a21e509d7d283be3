"""zennit's generalised Gamma rule for convolutions, computed once per forward pass.

zennit's :class:`zennit.rules.Gamma` recomputes five convolutions (four with modified weights)
and their gradients inside every backward pass, and the layer's ordinary gradient is computed and
thrown away as well. The modified forward passes do not depend on the explained target, so when
several targets of one image are explained (a GridPG grid), :class:`CachedGamma` computes them in
the forward pass, keeps only the stabilised denominators, and each target's backward pass is two
transposed convolutions (four where the layer's input has negative entries). The result is
zennit's, term by term (``tests/test_attribution_lrp.py``).

With ``W_a = W + gamma W+``, ``W_b = W + gamma W-``, ``x = x+ + x-`` and ``z = conv(x, W, b)``:

    d+ = conv(x+, W_a, b + gamma b+) + conv(x-, W_b)       used where z > 0
    d- = conv(x+, W_b, b + gamma b-) + conv(x-, W_a)       used where z < 0
    s+ = [z > 0] R / stab(d+),  s- = [z < 0] R / stab(d-)
    R_in = x+ (W_a^T s+ + W_b^T s-) + x- (W_b^T s+ + W_a^T s-)

where ``W^T s`` is the transposed convolution (the gradient of the convolution with respect to its
input) and ``stab`` adds the stabiliser with the entry's sign, as zennit does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CachedGamma"]


def _stabilize(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """zennit's ``stabilize``: shift by ``epsilon`` with each entry's sign (+ for 0)."""
    return x + ((x == 0.0).to(x) + x.sign()) * epsilon


def _transposed(conv: nn.modules.conv._ConvNd, weight: torch.Tensor, grad: torch.Tensor, x: torch.Tensor):
    """``weight^T grad``: the gradient of ``conv`` (with ``weight``) with respect to its input ``x``."""
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        out = conv._conv_forward(inputs, weight, None)
        return torch.autograd.grad(out, inputs, grad)[0]


def _transposed_fast(conv: nn.modules.conv._ConvNd, weight: torch.Tensor, grad: torch.Tensor, x: torch.Tensor):
    """The same as :func:`_transposed` without a forward pass (zero padding given as numbers)."""
    dims = x.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation),
        False, [0] * dims, conv.groups, [True, False, False],
    )[0]  # fmt: skip


class _GammaRelevance(torch.autograd.Function):
    """Forward: the layer's output ``z`` (computed by the module already) and the target-independent
    parts of the rule; backward: the relevance of the layer's input (replaces the gradient there,
    as zennit's hooks do)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, conv: nn.modules.conv._ConvNd, gamma: float, stabilizer: float):
        weight, bias = conv.weight, conv.bias
        w_a, w_b = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
        b_a = b_b = None
        if bias is not None:
            b_a, b_b = bias + gamma * bias.clamp(min=0), bias + gamma * bias.clamp(max=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        has_neg = bool((x_neg != 0).any())
        d_pos, d_neg = conv._conv_forward(x_pos, w_a, b_a), conv._conv_forward(x_pos, w_b, b_b)
        if has_neg:
            d_pos = d_pos + conv._conv_forward(x_neg, w_b, None)
            d_neg = d_neg + conv._conv_forward(x_neg, w_a, None)
        positive, negative = z > 0, z < 0
        # one denominator tensor: where z > 0 the rule divides by d+, where z < 0 by d-
        ctx.denominator = torch.where(positive, _stabilize(d_pos, stabilizer), _stabilize(d_neg, stabilizer))
        ctx.positive, ctx.negative = positive, negative
        ctx.conv, ctx.w_a, ctx.w_b, ctx.has_neg = conv, w_a, w_b, has_neg
        ctx.save_for_backward(x)
        return z.clone()  # the module's own output, now with this function's backward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        conv = ctx.conv
        fast = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        transposed = _transposed_fast if fast else _transposed
        scaled = grad / ctx.denominator
        s_pos, s_neg = scaled * ctx.positive, scaled * ctx.negative
        relevance = x.clamp(min=0) * (transposed(conv, ctx.w_a, s_pos, x) + transposed(conv, ctx.w_b, s_neg, x))
        if ctx.has_neg:
            back = transposed(conv, ctx.w_b, s_pos, x) + transposed(conv, ctx.w_a, s_neg, x)
            relevance = relevance + x.clamp(max=0) * back
        return relevance, None, None, None, None


class CachedGamma:
    """A zennit hook (usable in any composite's layer map) for ``Conv1d/2d/3d``: the Gamma rule of
    :class:`zennit.rules.Gamma` with the modified forward passes done once per forward pass.

    Args:
        gamma (float): weight of the added positive (negative) parts. Default: 0.25.
        stabilizer (float): added to the denominators with their sign. Default: 1e-6 (zennit's).
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6):
        self.gamma, self.stabilizer = gamma, stabilizer

    def copy(self) -> "CachedGamma":
        return CachedGamma(self.gamma, self.stabilizer)

    def forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        x = inputs[0]
        if not torch.is_grad_enabled() or not x.requires_grad:
            return None
        return _GammaRelevance.apply(x, output.detach(), module, self.gamma, self.stabilizer)

    def register(self, module: nn.Module):
        from zennit.core import RemovableHandleList

        if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
            raise TypeError(f"CachedGamma applies to Conv1d/2d/3d, not {type(module).__name__}")
        return RemovableHandleList([module.register_forward_hook(self.forward)])
