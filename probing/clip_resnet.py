"""CLIP's image ResNet-50 (Radford et al., 2021) without its attention pool, as How to Probe probes it.

The network follows OpenAI's ``ModifiedResNet``, so that their released weights load by name
(``visual.`` prefix; the text model and ``visual.attnpool.`` are left out): a stem of three 3x3
convolutions and a 2x2 average pool; bottlenecks that downsample by average pooling after their
3x3 convolution (stride 1 everywhere), and in the shortcut before a stride-1 1x1 convolution.
Its images are normalised with CLIP's own mean and std.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipResNet", "clip_state_dict"]

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ClipBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4), nn.ReLU()
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # named as OpenAI's: the pool "-1", so that the convolution and its norm are "0" and "1"
            self.downsample = nn.Sequential(
                OrderedDict([("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)), ("1", nn.BatchNorm2d(planes * 4))])
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + (x if self.downsample is None else self.downsample(x)))


class ClipResNet(nn.Module):
    """CLIP's ResNet trunk (``layers`` (3, 4, 6, 3) and ``width`` 64: RN50), ending at ``layer4``."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [ClipBottleneck(inplanes, planes, stride)] + [ClipBottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4
        self.num_features = inplanes

    def stem(self) -> nn.Sequential:
        return nn.Sequential(self.conv1, self.bn1, self.relu1, self.conv2, self.bn2, self.relu2, self.conv3, self.bn3, self.relu3, self.avgpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem()(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def clip_state_dict(obj) -> dict:
    """The image trunk's weights of an OpenAI CLIP checkpoint: a state dict (or a TorchScript
    model's) with ``visual.`` keys; the text model and the attention pool are dropped."""
    state = obj.state_dict() if isinstance(obj, nn.Module) or hasattr(obj, "state_dict") else obj
    trunk = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.") and not k.startswith("visual.attnpool.")}
    if not trunk:
        raise ValueError("no 'visual.' weights: not an OpenAI CLIP checkpoint")
    return trunk
