"""Feature cache: a frozen backbone's last feature map for a whole split, computed once.

Every trial on a node trains its probe from the same cached tensor instead of running the
backbone again. Files are keyed by backbone name, weights digest, data set and split, written
atomically under a file lock (one process computes, the others wait and read), and a file that
does not load is rebuilt rather than used.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from probing.backbones import StagedBackbone, cache_dir
from probing.datasets import Split

__all__ = ["compute_features", "cached_features"]


@torch.no_grad()
def compute_features(backbone: StagedBackbone, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W) -> last feature maps (N, C, h, w), float32 on the CPU."""
    device = next(backbone.parameters()).device
    chunks = [
        backbone(backbone.preprocess(images[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def cached_features(
    backbone: StagedBackbone, split: Split, dataset: str, split_name: str, log: Callable[[str], None] = print
) -> torch.Tensor:
    """The features of ``split`` under ``backbone``, from the cache or computed and cached."""
    from filelock import FileLock

    path = cache_dir() / "features" / f"{backbone.name}-{backbone.digest}" / f"{dataset}-{split_name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                features = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(features, torch.Tensor) and len(features) == len(split):
                    return features
            except Exception as err:  # a truncated or corrupt file: rebuild, never use
                log(f"feature cache {path} is unreadable ({err}); rebuilding it")
            else:
                log(f"feature cache {path} does not match the split ({len(split)} images); rebuilding it")
        log(f"computing {backbone.name} features of {dataset}/{split_name} ({len(split)} images)")
        features = compute_features(backbone, split.images)
        tmp = path.with_suffix(".tmp")
        torch.save(features, tmp)
        os.replace(tmp, path)
    return features
