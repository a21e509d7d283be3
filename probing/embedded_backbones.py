"""The embedded backbones: small networks for 32 px images, pre-trained at first use on the
embedded digits train split and cached. Together they make the "backbone" axis of the demo mean
what it means in How to Probe, the pre-training scheme: supervised, self-supervised (SimSiam),
and a B-cos network.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from probing.backbones import BACKBONES, BackboneConfig, BackboneEntry, StagedBackbone

__all__ = ["BasicBlock", "tiny_resnet", "tiny_bcos_resnet"]

# the ML-Att layers of the 3-block networks: middle = after the second block, final = last map
TINY_LAYERS = {"input": 0, "middle": 3, "final": 4}


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        # ReLU modules, one per use (not torch.relu): Guided Backprop and LRP rules hook modules.
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


# Per-channel statistics of the digits train images at 32 px (the same value on all 3 channels).
DIGITS_MEAN, DIGITS_STD = (0.305,) * 3, (0.324,) * 3


def tiny_resnet(widths: tuple[int, int, int] = (16, 32, 64)) -> StagedBackbone:
    """A small ResNet for 32 px images: stem, then one basic block per width (stride 1, 2, 2).

    Layers: ``middle`` is the output of the second block (16x16 at 32 px), ``final`` the last
    feature map (8x8 at 32 px), as ResNet's layer2 / layer4 in the paper.
    """
    w1, w2, w3 = widths
    stages = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU()),
        BasicBlock(w1, w1),
        BasicBlock(w1, w2, stride=2),
        BasicBlock(w2, w3, stride=2),
    )
    config = BackboneConfig(DIGITS_MEAN, DIGITS_STD, TINY_LAYERS)
    return StagedBackbone(stages, config, out_channels=w3)


def tiny_bcos_resnet(widths: tuple[int, int, int] = (16, 32, 64), b: float = 2.0) -> StagedBackbone:
    """A small B-cos ResNet (``bcos`` package modules, exponent ``b``) on ``[x, 1 - x]`` inputs.

    Same stage layout as :func:`tiny_resnet`; no biases anywhere, so in explanation mode the
    whole network is dynamic linear in its 6-channel input.
    """
    from functools import partial

    from bcos.models.resnet import BasicBlock as BcosBasicBlock, BcosResNet
    from bcos.modules import BcosConv2d

    w1, w2, w3 = widths
    if (w2, w3) != (2 * w1, 4 * w1):
        raise ValueError(f"B-cos ResNet widths double per stage, got {widths}")
    net = BcosResNet(
        BcosBasicBlock, [1, 1, 1], num_classes=2, in_chans=6, inplanes=w1, small_inputs=True,
        conv_layer=partial(BcosConv2d, b=b),
    )  # fmt: skip
    stages = nn.Sequential(nn.Sequential(net.conv1, net.bn1), net.layer1, net.layer2, net.layer3)
    config = BackboneConfig((0.0,) * 6, (1.0,) * 6, TINY_LAYERS, bcos_input=True)
    return StagedBackbone(stages, config, out_channels=w3)


def _pretrain(kind: str, epochs: int) -> Callable[[StagedBackbone, Callable[[str], None]], None]:
    def pretrain(backbone: StagedBackbone, log: Callable[[str], None]) -> None:
        from probing import pretrain as schemes

        recipe = dict(pretrain.recipe)
        getattr(schemes, f"pretrain_{recipe.pop('scheme')}")(backbone, **recipe, log=log)

    # what decides the weights, besides this module's code: keys the cache (probing.backbones.pretraining_key)
    pretrain.recipe = {"scheme": kind, "dataset": "digits", "epochs": epochs, "seed": 0}
    pretrain.code = ("probing.pretrain", "probing.datasets")
    return pretrain


BACKBONES.register("tiny_resnet_sup")(
    BackboneEntry(
        build=tiny_resnet,
        pretrain=_pretrain("supervised", 15),
        description="16/32/64-channel ResNet, supervised pre-training on the digits train split",
    )
)
BACKBONES.register("tiny_resnet_ssl")(
    BackboneEntry(
        build=tiny_resnet,
        pretrain=_pretrain("simsiam", 20),
        description="the same ResNet, self-supervised (SimSiam, no labels) on the digits train split",
    )
)
BACKBONES.register("tiny_bcos_resnet")(
    BackboneEntry(
        build=tiny_bcos_resnet,
        pretrain=_pretrain("supervised", 15),
        description="16/32/64-channel B-cos ResNet (B=2, 6-channel input), supervised on the digits train split",
        traits=frozenset({"bcos"}),
    )
)
