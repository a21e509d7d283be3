"""A frozen backbone with its BatchNorm layers merged into the convolutions before them.

In eval mode ``bn(conv(x))`` is one affine convolution, so the merged network computes the same
logits and the same input gradients (to rounding) with one layer fewer per pair. On the CPU this
matters most in the backward pass: BatchNorm's backward took 39% of a ResNet-50 input-gradient
pass at 448 px, more than the convolutions (torch profiler; BENCHMARKS.md). Gradient methods run
on the merged copy; LRP does not (zennit's canonizers merge BatchNorm themselves).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import fx, nn

__all__ = ["fold_batchnorm", "gradient_model"]


def _conv_batchnorm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) qualified names where the BatchNorm is the only use of the conv's output."""
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 (data-dependent control flow: such a network keeps its BatchNorm)
        return []
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        # exact types: subclasses (B-cos' uncentered BatchNorm, custom convolutions) compute other things
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
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


def _merge(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of the eval-mode ``module`` in which every BatchNorm2d that directly follows a Conv2d
    is merged into it and replaced by ``nn.Identity``; the module structure (blocks, ReLU modules)
    stays as it is. Networks that torch.fx cannot trace are copied unchanged."""
    folded = copy.deepcopy(module)
    if not any(isinstance(m, nn.BatchNorm2d) and not m.training for m in folded.modules()):
        return folded
    modules = dict(folded.named_modules())
    for conv_name, bn_name in _conv_batchnorm_pairs(folded):
        bn = modules[bn_name]
        if bn.training or bn.running_var is None:
            continue
        _merge(modules[conv_name], bn)
        parent, _, child = bn_name.rpartition(".")
        setattr(modules[parent] if parent else folded, child, nn.Identity())
    return folded


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_key(module: nn.Module) -> tuple:
    """Changes when any weight or statistic is replaced, moved or modified in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in module.state_dict().values())


def gradient_model(model):
    """``model`` with :func:`fold_batchnorm` applied to its backbone stages, cached per model until
    its state changes; models without ``backbone.stages`` (grid models) are returned as they are."""
    stages = getattr(getattr(model, "backbone", None), "stages", None)
    if not isinstance(stages, nn.Module) or model.training:
        return model
    key = _state_key(model)
    cached = _FOLDED.get(model)
    if cached is None or cached[0] != key:
        folded = copy.copy(model)  # shares the head and everything else; only the stages are new
        folded._modules = dict(model._modules)
        folded.backbone = copy.copy(model.backbone)
        folded.backbone._modules = dict(model.backbone._modules)
        folded.backbone.stages = fold_batchnorm(stages)
        cached = _FOLDED[model] = (key, folded)
    return cached[1]
