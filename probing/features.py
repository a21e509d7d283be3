"""Feature cache: a frozen backbone's last feature map for a whole split, computed once.

Every trial on a node trains its probe from the same cached tensor instead of running the
backbone again. A file is keyed by backbone name and weights digest, data set, split, transform,
dtype and the split's fingerprint (its files' resolved paths, sizes and modification times, and
its labels: ``Split.fingerprint``), so another folder of the same size or an image rewritten in
place gets features of its own. It is written atomically under a file lock (one process computes,
the others wait and read) and carries the SHA-256 of its tensor, so that a truncated or corrupted
file is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch

from probing.backbones import StagedBackbone, cache_dir
from probing.datasets import Split
from probing.devices import extraction_autocast

__all__ = ["compute_features", "cached_features", "feature_cache_path"]


@torch.no_grad()
def compute_features(
    backbone: StagedBackbone,
    images,
    batch_size: int = 256,
    log: Callable[[str], None] | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W) (a tensor or a lazy image list) -> last feature maps (N, C, h, w)
    on the CPU, computed on the backbone's device under autocast to ``precision`` (``float32``: none)."""
    device = next(backbone.parameters()).device
    chunks = []
    for i in range(0, len(images), batch_size):
        with extraction_autocast(device, precision):
            chunks.append(backbone(backbone.preprocess(images[i : i + batch_size].to(device))).cpu())
        if log is not None and len(images) > batch_size:
            log(f"  features: {min(i + batch_size, len(images))}/{len(images)} images")
    return torch.cat(chunks)


def _checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def feature_cache_path(
    backbone: StagedBackbone, split: Split, dataset: str, split_name: str, dtype: torch.dtype, precision: str = "float32"
):
    dtype_name = str(dtype).removeprefix("torch.")
    computed = "" if precision == "float32" else f"-autocast_{precision}"  # float32 files keep their names
    name = f"{dataset}-{split_name}-{split.transform}-{dtype_name}{computed}-{split.fingerprint}.pt"
    return cache_dir() / "features" / f"{backbone.name}-{backbone.digest}" / name


def cached_features(
    backbone: StagedBackbone,
    split: Split,
    dataset: str,
    split_name: str,
    log: Callable[[str], None] = print,
    dtype: torch.dtype = torch.float32,
    precision: str = "float32",
) -> torch.Tensor:
    """The features of ``split`` under ``backbone`` in ``dtype`` (float16 halves the disk and memory),
    computed under autocast to ``precision``, from the cache or computed and cached."""
    from filelock import FileLock

    path = feature_cache_path(backbone, split, dataset, split_name, dtype, precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                features = stored["features"]
                if len(features) != len(split):
                    log(f"feature cache {path} has {len(features)} rows, the split {len(split)} images; rebuilding it")
                elif _checksum(features) != stored["sha256"]:
                    log(f"feature cache {path} fails its checksum; rebuilding it")
                else:
                    return features
            except Exception as err:  # a truncated or corrupt file: rebuild, never use
                log(f"feature cache {path} is unreadable ({err}); rebuilding it")
        log(f"computing {backbone.name} features of {dataset}/{split_name} ({len(split)} images)")
        features = compute_features(backbone, split.images, log=log, precision=precision).to(dtype)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"features": features, "sha256": _checksum(features)}, tmp)
        os.replace(tmp, path)
    return features
