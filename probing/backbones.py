"""Frozen backbones: one registry, one interface, weights cached on disk.

Every backbone is a sequence of stages, so the layers that ML-Att evaluates at (``input``,
``middle``, ``final``; Rao et al., CVPR 2022) are stage boundaries: ``forward_to(x, layer)`` runs
the stages before a layer and ``forward_from(a, layer)`` the rest. No hooks are needed to read or
differentiate an inner activation. Preprocessing (normalisation) is kept apart from the
architecture in :class:`BackboneConfig`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from probing.registry import Registry

__all__ = [
    "BACKBONES",
    "LAYERS",
    "BackboneConfig",
    "StagedBackbone",
    "cache_dir",
    "create_backbone",
    "list_backbones",
]

LAYERS = ("input", "middle", "final")


def cache_dir() -> Path:
    """Where weights and features are cached: ``$PROBESWEEP_CACHE`` or ``~/.cache/probesweep``."""
    root = os.environ.get("PROBESWEEP_CACHE") or Path.home() / ".cache" / "probesweep"
    return Path(root).expanduser().resolve()


@dataclass(frozen=True)
class BackboneConfig:
    """What a backbone expects of its input, apart from its architecture.

    Attributes:
        mean, std: per-channel normalisation applied to images in [0, 1].
        layer_stages: for each ML-Att layer, how many stages run before it.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layer_stages: dict[str, int] = field(default_factory=dict)


class StagedBackbone(nn.Module):
    """A backbone as ``nn.Sequential`` stages plus its :class:`BackboneConfig`.

    Args:
        stages (nn.Sequential): the network up to its last spatial feature map.
        config (BackboneConfig): normalisation and layer positions.
        out_channels (int): channels of the last feature map.
    """

    def __init__(self, stages: nn.Sequential, config: BackboneConfig, out_channels: int):
        super().__init__()
        self.stages = stages
        self.config = config
        self.out_channels = out_channels
        self.name = "unnamed"  # the registry name, set by create_backbone
        self.digest = "untrained"  # of the weights file, set by create_backbone; keys the feature cache
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> the network's input."""
        return (images - self.mean) / self.std

    def _stage_index(self, layer: str) -> int:
        if layer not in self.config.layer_stages:
            raise ValueError(f"unknown layer {layer!r}: known are {', '.join(self.config.layer_stages)}")
        return self.config.layer_stages[layer]

    def forward_to(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The activation at ``layer`` for preprocessed input ``x``."""
        return self.stages[: self._stage_index(layer)](x)

    def forward_from(self, activation: torch.Tensor, layer: str) -> torch.Tensor:
        """The last feature map, computed from the activation at ``layer``."""
        return self.stages[self._stage_index(layer) :](activation)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (B, 3, H, W) -> last spatial feature map (B, C, h, w)."""
        return self.stages(x)

    forward = forward_features


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
    config = BackboneConfig(DIGITS_MEAN, DIGITS_STD, {"input": 0, "middle": 3, "final": 4})
    return StagedBackbone(stages, config, out_channels=w3)


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: how to build it and, for embedded ones, how to pre-train it."""

    build: Callable[[], StagedBackbone]
    pretrain: Callable[[StagedBackbone, Callable[[str], None]], None] | None = None  # (backbone, log)
    description: str = ""


BACKBONES: Registry[BackboneEntry] = Registry("backbone")


def _pretrain_supervised_on_digits(backbone: StagedBackbone, log: Callable[[str], None]) -> None:
    from probing.pretrain import pretrain_supervised

    pretrain_supervised(backbone, dataset="digits", epochs=15, seed=0, log=log)


BACKBONES.register("tiny_resnet_sup")(
    BackboneEntry(
        build=tiny_resnet,
        pretrain=_pretrain_supervised_on_digits,
        description="16/32/64-channel ResNet, supervised pre-training on the digits train split",
    )
)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def create_backbone(name: str, log: Callable[[str], None] = print) -> StagedBackbone:
    """Build the backbone ``name`` with its weights, frozen and in eval mode.

    Embedded backbones are pre-trained at first use and cached under :func:`cache_dir`; the
    cache is shared by all processes (a file lock makes one train while the others wait).
    """
    from filelock import FileLock

    entry = BACKBONES.get(name)
    backbone = entry.build()
    weights = cache_dir() / "backbones" / f"{name}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(weights) + ".lock"):
        if not weights.exists():
            if entry.pretrain is None:
                raise FileNotFoundError(f"no weights for backbone {name!r} at {weights}")
            log(f"pre-training backbone {name} (first use; cached at {weights})")
            entry.pretrain(backbone, log)
            tmp = weights.with_suffix(".tmp")
            torch.save(backbone.state_dict(), tmp)
            os.replace(tmp, weights)  # atomic: readers never see a half-written file
        state = torch.load(weights, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)
    backbone.name, backbone.digest = name, _file_digest(weights)
    backbone.eval().requires_grad_(False)
    return backbone


def list_backbones(pattern: str = "*") -> list[str]:
    return BACKBONES.names(pattern)
