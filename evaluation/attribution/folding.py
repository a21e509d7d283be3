"""BatchNorm merged into the convolutions before it, inside a ``with`` block, on the model itself.

In eval mode ``bn(conv(x))`` is one affine convolution, so the merged network computes the same
logits and the same input gradients (to rounding) with one layer fewer per pair. On the CPU this
matters most in the backward pass: BatchNorm's backward took 39% of a ResNet-50 input-gradient
pass at 448 px, more than the convolutions (torch profiler; BENCHMARKS.md).

:func:`merged_batchnorm` is a reversible rewrite in the manner of zennit's canonizers: it changes
the model it is given (so whatever else is switched on that model, such as B-cos explanation mode,
applies to the network that is differentiated) and puts back the very same parameter and module
objects when the block ends, also when it raises. There is no cache: a method's result never
depends on what ran before it. LRP does not use it (zennit's canonizers merge BatchNorm themselves).
Finding the pairs traces the network with torch.fx on every block: measured 0.23-0.33 s on
ResNet-50 here, against 8.8 s for one Input x Gradient call of 4 rows at 448 px (about 3%).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import fx, nn

__all__ = ["merged_batchnorm", "conv_batchnorm_pairs"]


def conv_batchnorm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) qualified names where an eval-mode BatchNorm2d is the only use of a Conv2d's output."""
    modules = dict(module.named_modules())
    if not any(type(m) is nn.BatchNorm2d and not m.training for m in modules.values()):
        return []  # nothing to merge (already merged, or B-cos' uncentred norms only): no trace needed
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 (data-dependent control flow: such a network keeps its BatchNorm)
        return []
    pairs = []
    for node in graph.nodes:
        # exact types: subclasses (B-cos' uncentred BatchNorm, custom convolutions) compute other things
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None:
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and type(modules.get(source.target)) is nn.Conv2d
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def _merged_parameters(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[nn.Parameter, nn.Parameter]:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        return weight, nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def _stages(model: nn.Module) -> nn.Module | None:
    """The backbone stages of a probed model, or of the model a grid model wraps; None otherwise."""
    inner = getattr(model, "model", model)
    stages = getattr(getattr(inner, "backbone", None), "stages", None)
    return stages if isinstance(stages, nn.Module) else None


@contextmanager
def merged_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every eval-mode BatchNorm2d of ``model``'s backbone stages that directly
    follows a Conv2d is merged into it and replaced by ``nn.Identity``; on exit the original
    parameters and modules are put back (the state dict is then as before, bit for bit).

    Models without backbone stages, and networks that torch.fx cannot trace, are left as they are.
    Nested blocks are cheap: the inner one finds nothing left to merge.

    Yields:
        the same ``model``.
    """
    stages = _stages(model)
    undo: list[tuple[nn.Module, str, object]] = []  # (owner, attribute, original), restored in reverse
    try:
        if stages is not None:
            modules = dict(stages.named_modules())
            for conv_name, bn_name in conv_batchnorm_pairs(stages):
                conv, bn = modules[conv_name], modules[bn_name]
                weight, bias = _merged_parameters(conv, bn)
                parent_name, _, child = bn_name.rpartition(".")
                parent = modules[parent_name] if parent_name else stages
                undo += [(conv, "weight", conv.weight), (conv, "bias", conv.bias), (parent, child, bn)]
                conv.weight, conv.bias = weight, bias
                setattr(parent, child, nn.Identity())
        yield model
    finally:
        for owner, name, original in reversed(undo):  # a conv without bias gets None back
            setattr(owner, name, original)
