"""Pre-training of the embedded backbones on the embedded train split (run once, then cached)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from probing.datasets import create_dataset

__all__ = ["pretrain_supervised", "random_shift"]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px (zero padding): a cheap augmentation."""
    padded = F.pad(images, [max_shift] * 4)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def pretrain_supervised(
    backbone: nn.Module,
    dataset: str,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: Callable[[str], None] = print,
) -> None:
    """Train ``backbone`` in place with a temporary linear classifier (pooled features, CE)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = create_dataset(dataset, "train")
    classifier = nn.Linear(backbone.out_channels, train.num_classes)
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(train) // batch_size)
    )
    backbone.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        correct, total_loss = 0, 0.0
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            x = backbone.preprocess(random_shift(train.images[idx], 3, generator))
            logits = classifier(backbone(x).mean(dim=(2, 3)))
            loss = F.cross_entropy(logits, train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == train.labels[idx]).sum().item()
        log(f"  epoch {epoch + 1}/{epochs}: loss {total_loss / len(train):.3f}, train acc {correct / len(train):.3f}")
    backbone.eval()
