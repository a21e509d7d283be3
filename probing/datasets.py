"""Data sets: images in [0, 1] with labels, in fixed train and val splits.

The embedded data set is scikit-learn's handwritten digits (1,797 real 8x8 scans shipped with the
package, so nothing is ever downloaded), upscaled to 32x32 and repeated over 3 channels. Data sets
on disk (ImageNet-style folders, PASCAL VOC 2007, COCO 2014) live in :mod:`probing.image_data`
and load their images on demand.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from probing.registry import Registry, unknown_name

__all__ = ["Split", "ShiftedImages", "DATASETS", "SPLITS", "create_dataset", "list_datasets"]

DATASETS: Registry = Registry("dataset")

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """One split of a data set.

    Attributes:
        images: (N, 3, H, W) float32 in [0, 1], not normalised (backbones normalise): a tensor,
            or an indexable that loads them on demand (``images[i]``, ``images[a:b]``,
            ``images[index_tensor]`` and ``images.shape`` behave as for a tensor).
        labels (Tensor): (N,) int64 class indices, or (N, K) multi-hot floats (multi-label).
        classes (tuple[str, ...]): class names, index = label.
        transform (str): names the deterministic transform that made ``images`` (keys the feature cache).
        boxes (tuple[Tensor, ...]): for data sets with boxes, one (M, 6) tensor per image:
            class, x0, y0, x1, y1 in pixels of ``images``, and a flag (VOC difficult, COCO crowd).
        skipped (int): unreadable images left out (``skip_corrupt``).
        augmented: the same images with random training augmentation, or None.
    """

    images: Any
    labels: torch.Tensor
    classes: tuple[str, ...]
    transform: str = "none"
    boxes: tuple[torch.Tensor, ...] | None = None
    skipped: int = 0
    augmented: Any = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def fingerprint(self) -> str:
        """12 hex digits that change when the images or labels change: for files, their resolved
        paths, sizes and modification times (``stat`` of each file: seconds for ImageNet's 1.28 M on
        a local disk); for a tensor, its bytes. Keys the feature cache, so that two data sets with the
        same name and size, or images rewritten in place, never share features."""
        digest = hashlib.sha256()
        describe = getattr(self.images, "fingerprint_parts", None)
        if describe is not None:
            for part in describe():
                digest.update(part.encode())
        else:
            digest.update(torch.as_tensor(self.images).contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(self.labels.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]

    @property
    def multilabel(self) -> bool:
        return self.labels.dim() == 2

    def __len__(self) -> int:
        return len(self.labels)


class ShiftedImages:
    """A tensor of images, each translated by up to ``max_shift`` px (zero fill) whenever it is read."""

    def __init__(self, images: torch.Tensor, max_shift: int, seed: int = 0):
        self.images, self.max_shift = images, max_shift
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = images.shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        batch = self.images[index]
        single = batch.dim() == 3
        batch = batch[None] if single else batch
        size, m = batch.shape[-1], self.max_shift
        padded = F.pad(batch, [m] * 4)
        offsets = torch.randint(0, 2 * m + 1, (len(batch), 2), generator=self.generator).tolist()
        out = torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])
        return out[0] if single else out


def _digits_file():
    """The pixels (n, 64) and labels of scikit-learn's bundled ``digits.csv.gz``, read as
    ``load_digits`` reads it but without importing scikit-learn (about 1 s in every trial process)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


@DATASETS.register("digits")
def digits(split: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's handwritten digits, upscaled bilinearly to ``size`` px, 3 channels.

    The split is stratified per class and fixed by ``seed``, so every trial and every machine sees
    the same train and val images. Training augmentation: random shifts of up to 3 px.
    """
    pixels, target = _digits_file()
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # pixel values 0..16
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(target, dtype=torch.int64)

    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_val[members[: round(len(members) * val_fraction)]] = True
    keep = is_val if split == "val" else ~is_val
    classes = tuple(str(c) for c in range(10))
    return Split(images[keep], labels[keep], classes, f"bilinear{size}", augmented=ShiftedImages(images[keep], 3, seed))


def create_dataset(name: str, split: str, **options) -> Split:
    """Load ``split`` ("train" or "val") of the registered data set ``name`` with its ``options``."""
    if split not in SPLITS:
        raise ValueError(unknown_name("split", split, SPLITS))
    return DATASETS.get(name)(split, **options)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)

