"""Data sets: images in [0, 1] with integer labels, split once with a fixed seed.

The embedded data set is scikit-learn's handwritten digits (1,797 real 8x8 scans shipped with the
package, so nothing is ever downloaded), upscaled to 32x32 and repeated over 3 channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from probing.registry import Registry

__all__ = ["Split", "DATASETS", "create_dataset", "list_datasets"]

DATASETS: Registry = Registry("dataset")

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """One split of a data set.

    Attributes:
        images (Tensor): (N, 3, H, W) float32 in [0, 1], not normalised (backbones normalise).
        labels (Tensor): (N,) int64 class indices.
        classes (tuple[str, ...]): class names, index = label.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)


@DATASETS.register("digits")
def digits(split: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's handwritten digits, upscaled bilinearly to ``size`` px, 3 channels.

    The split is stratified per class and fixed by ``seed``, so every trial and every machine sees
    the same train and val images.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(raw.target, dtype=torch.int64)

    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_val[members[: round(len(members) * val_fraction)]] = True
    keep = is_val if split == "val" else ~is_val
    return Split(images[keep], labels[keep], tuple(str(c) for c in range(10)))


def create_dataset(name: str, split: str, **kwargs) -> Split:
    """Load ``split`` ("train" or "val") of the registered data set ``name``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: known are {', '.join(SPLITS)}")
    return DATASETS.get(name)(split, **kwargs)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)
