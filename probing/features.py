"""Feature cache: a frozen backbone's last feature map for a whole split, computed once.

Every trial trains its probe from the same cached features instead of running the backbone again.
A cache is a folder of fixed-size shards and a manifest (:mod:`probing.shards`), keyed by backbone
name and weights digest, data set, split, transform, dtype, extraction precision and the split's
fingerprint (its files' resolved paths, sizes and modification times, and its labels:
``Split.fingerprint``), so another folder of the same size or an image rewritten in place gets
features of its own. It is built under a file lock (one process computes, the others wait and
read), one atomic shard at a time, so an interrupted build keeps its shards; a sweep's driver
builds it on the cluster through Ray Data (``sweeps.extraction``) and checks every shard's SHA-256
first, so that a corrupted shard is rebuilt, never used. Readers memory-map the shards.
"""

from __future__ import annotations

import json
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from probing.backbones import StagedBackbone, cache_dir
from probing.datasets import Split
from probing.devices import extraction_autocast
from probing.shards import ShardedFeatures, ShardLayout, missing_shards, read_manifest, write_manifest, write_shard

__all__ = [
    "SHARD_ROWS", "FeatureJob", "cached_features", "compute_features", "feature_cache_path", "feature_facts", "features_lock",
    "plan_features",
]  # fmt: skip

# rows per shard: 51 MB of ResNet-50 7x7 maps in float16, 8 MB pooled; the unit an interrupted
# extraction loses and a cluster task computes
SHARD_ROWS = 1024


@torch.no_grad()
def compute_features(
    backbone: StagedBackbone,
    images,
    batch_size: int = 128,
    log: Callable[[str], None] | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W) (a tensor or a lazy image list) -> last feature maps (N, C, h, w)
    on the CPU, computed on the backbone's device under autocast to ``precision`` (``float32``: none).

    Each batch enters the backbone in channels-last memory format, the layout oneDNN's (CPU) and
    cuDNN's (GPU) fast convolution kernels take, so every convolution after it runs in that layout
    (the backbone's weights are left as they are). Measured on ResNet-18, 224 px, 2 cores: 1.6x
    the default layout's images/s (``bench/feature_extraction.py``); the features equal the default
    layout's up to float rounding (6e-7 of their largest value)."""
    device = next(backbone.parameters()).device
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = backbone.preprocess(images[i : i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        with extraction_autocast(device, precision):
            chunks.append(backbone(batch).contiguous().cpu())
        if log is not None and len(images) > batch_size:
            log(f"  features: {min(i + batch_size, len(images))}/{len(images)} images")
    return torch.cat(chunks)


def feature_cache_path(
    backbone: StagedBackbone, split: Split, dataset: str, split_name: str, dtype: torch.dtype, precision: str = "float32"
) -> Path:
    """The cache folder of these features (shards and manifest)."""
    dtype_name = str(dtype).removeprefix("torch.")
    computed = "" if precision == "float32" else f"-autocast_{precision}"
    name = f"{dataset}-{split_name}-{split.transform}-{dtype_name}{computed}-{split.fingerprint}"
    return cache_dir() / "features" / f"{backbone.name}-{backbone.digest}" / name


def feature_facts(backbone: StagedBackbone, split: Split, dataset: str, split_name: str, dtype: torch.dtype, precision: str) -> dict[str, Any]:
    """What a manifest says the features are."""
    return {
        "backbone": backbone.name, "backbone_digest": backbone.digest, "dataset": dataset, "split": split_name,
        "transform": split.transform, "fingerprint": split.fingerprint, "layer": "final",
        "dtype": str(dtype).removeprefix("torch."), "precision": precision,
    }  # fmt: skip


@contextmanager
def features_lock(folder: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The folder's build lock; says so when another process holds it (and this one waits for it)."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "build.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process's extraction of {folder.name} (lock {lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _usable(folder: Path, n_rows: int) -> dict | None:
    manifest = read_manifest(folder)
    return manifest if manifest is not None and manifest["n_rows"] == n_rows else None


@dataclass(frozen=True)
class FeatureJob:
    """A cache folder to complete: its layout, the shards to compute and what the manifest will say."""

    folder: Path
    layout: ShardLayout
    missing: list[int]
    facts: dict[str, Any]

    def finish(self) -> None:
        write_manifest(self.folder, self.layout, self.facts)


def plan_features(
    backbone: StagedBackbone, split: Split, dataset: str, split_name: str, dtype: torch.dtype, precision: str,
    verify: bool, shard_rows: int, log: Callable[[str], None],
) -> FeatureJob | None:  # fmt: skip
    """With the folder's lock held (:func:`features_lock`): None when the cache is complete (and,
    with ``verify``, every shard passes its checksum), else the job of computing what is missing."""
    folder = feature_cache_path(backbone, split, dataset, split_name, dtype, precision)
    manifest = _usable(folder, len(split))
    layout = ShardLayout(len(split), _recorded_shard_rows(folder, len(split), shard_rows))
    missing = missing_shards(folder, layout, log) if manifest is None or verify else []
    if manifest is not None and not missing:
        return None
    # shards are replaced whole: readers of an earlier manifest never see a partial one
    (folder / LAYOUT).write_text(json.dumps({"n_rows": layout.n_rows, "shard_rows": layout.shard_rows}))
    return FeatureJob(folder, layout, missing, feature_facts(backbone, split, dataset, split_name, dtype, precision))


def cached_features(
    backbone: StagedBackbone,
    split: Split,
    dataset: str,
    split_name: str,
    log: Callable[[str], None] = print,
    dtype: torch.dtype = torch.float32,
    precision: str = "float32",
    verify: bool = True,
    shard_rows: int = SHARD_ROWS,
) -> ShardedFeatures:
    """The features of ``split`` under ``backbone`` in ``dtype`` (float16 halves the disk), computed
    under autocast to ``precision``: read from the cache, or its missing shards computed here, one
    after the other (a sweep's driver has the cluster compute them: ``sweeps.extraction``).

    Args:
        verify: check every shard's SHA-256 (and rebuild those that fail) even when the cache is
            complete; without, only the shards' sizes are checked (a trial reads what its sweep's
            driver verified, instead of hashing the whole cache again).
    """
    folder = feature_cache_path(backbone, split, dataset, split_name, dtype, precision)
    manifest = _usable(folder, len(split))
    if manifest is not None and not verify:
        return ShardedFeatures(folder, manifest)
    with features_lock(folder, log):
        job = plan_features(backbone, split, dataset, split_name, dtype, precision, verify, shard_rows, log)
        if job is not None:
            log(f"computing {backbone.name} features of {dataset}/{split_name} ({len(split)} images, {len(job.missing)} of {len(job.layout)} shards)")
            for index in job.missing:
                start, stop = job.layout.rows(index)
                write_shard(folder, index, compute_features(backbone, split.images[start:stop], precision=precision).to(dtype), platform.node())
                if len(job.layout) > 1:
                    log(f"  features: shard {index + 1}/{len(job.layout)}")
            job.finish()
    return ShardedFeatures(folder, read_manifest(folder))


LAYOUT = "layout.json"  # written when a build starts: a resumed build keeps the shards' size


def _recorded_shard_rows(folder: Path, n_rows: int, default: int) -> int:
    """The shard size a build of this folder started with, so that its finished shards count."""
    try:
        recorded = json.loads((folder / LAYOUT).read_text())
        return recorded["shard_rows"] if recorded["n_rows"] == n_rows else default
    except (OSError, ValueError, KeyError):
        return default
