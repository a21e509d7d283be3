"""Frozen backbones: one registry, one interface, weights cached on disk.

Every backbone is a sequence of stages, so the layers that ML-Att evaluates at (``input``,
``middle``, ``final``; Rao et al., CVPR 2022) are stage boundaries: ``forward_to(x, layer)`` runs
the stages before a layer and ``forward_from(a, layer)`` the rest. No hooks are needed to read or
differentiate an inner activation. Preprocessing (normalisation) is kept apart from the
architecture in :class:`BackboneConfig`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from probing.registry import Registry, unknown_name

__all__ = [
    "BACKBONES",
    "LAYERS",
    "BackboneConfig",
    "StagedBackbone",
    "cache_dir",
    "create_backbone",
    "list_backbones",
    "pretrained_weights_file",
    "pretraining_key",
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
        bcos_input: B-cos networks take ``[x, 1 - x]`` (6 channels) instead of normalised images.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layer_stages: dict[str, int] = field(default_factory=dict)
    bcos_input: bool = False


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
        self.weights_file = "embedded"  # the file name the weights came from (logged by a trial)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> the network's input."""
        if self.config.bcos_input:
            return torch.cat([images, 1.0 - images], dim=1)
        return (images - self.mean) / self.std

    def _stage_index(self, layer: str) -> int:
        if layer not in self.config.layer_stages:
            raise ValueError(unknown_name("layer", layer, self.config.layer_stages))
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


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone.

    Attributes:
        build: () -> the architecture with initial weights.
        pretrain: for embedded backbones, trains a built one in place at first use (then cached).
        load: for backbones with published weights, ``(backbone, **options) -> weights digest``
            loads them (options: ``weights``, ``checkpoint_format``).
        traits: ``evaluation.attribution.common.model_traits`` of the built network.
    """

    build: Callable[[], StagedBackbone]
    pretrain: Callable[[StagedBackbone, Callable[[str], None]], None] | None = None  # (backbone, log)
    load: Callable[..., str] | None = None  # (backbone, **options) -> weights digest
    description: str = ""
    # what the network is built of, as attribution methods care (``bcos``, ``vit``): lets a spec be
    # checked against the methods' refusals before anything is built
    traits: frozenset[str] = frozenset()


BACKBONES: Registry[BackboneEntry] = Registry("backbone")


def file_digest(path: Path, full: bool = False) -> str:
    """The file's SHA-256: its first 12 hex digits (keys the feature cache to the weights), or all."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() if full else digest.hexdigest()[:12]


def _verified_state(weights: Path, digest: str, log) -> dict | None:
    """The cached state dict if the file is whole (its SHA-256 ``digest`` equals the one saved beside
    it), else None with a log line saying why: a truncated, overwritten or empty file is rebuilt."""
    checksum = weights.with_suffix(".sha256")
    if not checksum.is_file() or checksum.read_text().strip() != digest:
        log(f"backbone cache {weights} fails its checksum (or has none); pre-training it again")
        return None
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (whatever is wrong with it, it is rebuilt)
        log(f"backbone cache {weights} is unreadable ({err}); pre-training it again")
        return None


def pretraining_key(name: str) -> str:
    """12 hex digits of SHA-256 over what decides an embedded backbone's pre-trained weights: its
    name, its recipe (``pretrain.recipe``: scheme, epochs, data, seed), the source of the modules
    that build and pre-train it (this one, and ``pretrain.code``, the modules it calls) and torch's
    version. A change to any of them names a new cache file, so the backbone is pre-trained again."""
    entry = BACKBONES.get(name)
    modules = {inspect.getmodule(entry.build), inspect.getmodule(entry.pretrain), inspect.getmodule(_pretrained_state)}
    modules |= {importlib.import_module(m) for m in getattr(entry.pretrain, "code", ())}
    digest = hashlib.sha256(f"{name}\n{getattr(entry.pretrain, 'recipe', None)!r}\n{torch.__version__}".encode())
    for source in sorted(inspect.getsource(m) for m in modules if m is not None):
        digest.update(source.encode())
    return digest.hexdigest()[:12]


def pretrained_weights_file(name: str) -> Path:
    """Where the embedded backbone ``name``'s pre-trained weights are cached (keyed by :func:`pretraining_key`)."""
    return cache_dir() / "backbones" / f"{name}-{pretraining_key(name)}.pt"


PRETRAINING_THREADS = 1  # a fixed count: float sums split over threads round differently, and so would the weights


def _pretrained_state(entry: BackboneEntry, log) -> dict:
    """Pre-train a fresh network the same way whatever ran before: its initial weights drawn from
    seed 0 and one thread, with the caller's RNG state and thread count put back afterwards."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.set_num_threads(PRETRAINING_THREADS)
            backbone = entry.build()
            entry.pretrain(backbone, log)
            return backbone.state_dict()
    finally:
        torch.set_num_threads(threads)


def _cached_pretrained(name: str, entry: BackboneEntry, backbone: StagedBackbone, log) -> str:
    """Load an embedded backbone's weights, pre-training and caching them first if needed (or if
    the cached file fails its checksum)."""
    from filelock import FileLock

    weights = pretrained_weights_file(name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(weights) + ".lock"):
        digest = file_digest(weights, full=True) if weights.exists() else ""  # the file is read once
        state = _verified_state(weights, digest, log) if digest else None
        if state is None:
            log(f"pre-training backbone {name} (first use; cached at {weights})")
            state = _pretrained_state(entry, log)
            tmp = weights.with_suffix(".tmp")
            torch.save(state, tmp)
            digest = file_digest(tmp, full=True)
            weights.with_suffix(".sha256").write_text(digest)
            os.replace(tmp, weights)  # atomic: readers never see a half-written file
    backbone.load_state_dict(state, strict=True)
    return digest[:12]


def create_backbone(name: str, log: Callable[[str], None] = print, **options) -> StagedBackbone:
    """Build the backbone ``name`` with its weights, frozen and in eval mode.

    Embedded backbones are pre-trained at first use and cached under :func:`cache_dir`; the
    cache is shared by all processes (a file lock makes one train while the others wait).
    Backbones with published weights take ``weights`` (a checkpoint file) among ``options``;
    see :mod:`probing.zoo`.
    """
    entry = BACKBONES.get(name)
    if entry.load is not None:
        backbone = entry.build()
        digest = entry.load(backbone, **options)
    else:
        if options:
            raise ValueError(f"backbone {name!r} takes no options, got {', '.join(sorted(options))}")
        backbone = entry.build()
        digest = _cached_pretrained(name, entry, backbone, log)
    backbone.name, backbone.digest = name, digest
    backbone.eval().requires_grad_(False)
    return backbone


def list_backbones(pattern: str = "*") -> list[str]:
    return BACKBONES.names(pattern)

