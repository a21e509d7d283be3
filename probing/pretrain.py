"""Pre-training of the embedded backbones on the embedded train split (run once, then cached).

Two schemes, so that the backbone axis compares pre-training as How to Probe does:
``pretrain_supervised`` (labels, CE through a temporary linear classifier) and
``pretrain_simsiam`` (no labels: SimSiam, Chen & He 2021 - two augmented views, a projector and a
predictor, negative cosine similarity with a stop-gradient on the other view).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from probing.datasets import create_dataset

__all__ = ["pretrain_supervised", "pretrain_simsiam", "simsiam_views"]


def _run(backbone, parts: nn.Module, epochs: int, n: int, batch_size: int, lr: float, step, log) -> None:
    """The shared loop: Adam with a one-cycle schedule over ``backbone`` and ``parts``; ``step(idx)`` -> (loss, note)."""
    params = list(backbone.parameters()) + list(parts.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * -(-n // batch_size))
    generator = torch.Generator().manual_seed(0)
    backbone.train(), parts.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, notes = 0.0, 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss, note = step(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, notes = total + loss.item() * len(idx), notes + note
        log(f"  epoch {epoch + 1}/{epochs}: loss {total / n:.3f}" + (f", train acc {notes / n:.3f}" if notes else ""))
    backbone.eval()


def pretrain_supervised(
    backbone: nn.Module, dataset: str, epochs: int, seed: int, batch_size: int = 64, lr: float = 2e-3,
    log: Callable[[str], None] = print,
) -> None:  # fmt: skip
    """Train ``backbone`` in place with a temporary linear classifier on pooled features (CE), on
    the split's augmented images."""
    torch.manual_seed(seed)
    train = create_dataset(dataset, "train")
    classifier = nn.Linear(backbone.out_channels, train.num_classes)

    def step(idx):
        logits = classifier(backbone(backbone.preprocess(train.augmented[idx])).mean(dim=(2, 3)))
        return F.cross_entropy(logits, train.labels[idx]), (logits.argmax(1) == train.labels[idx]).sum().item()

    _run(backbone, classifier, epochs, len(train), batch_size, lr, step, log)


def simsiam_views(images: torch.Tensor) -> torch.Tensor:
    """One random view per image: resized crop, small rotation, contrast and noise (digits are not flipped)."""
    from torchvision.transforms import v2  # here, not at import: torchvision takes ~2 s to import

    crop = v2.Compose([v2.RandomResizedCrop(images.shape[-1], scale=(0.5, 1.0), antialias=True), v2.RandomRotation(15)])
    views = torch.stack([crop(image) for image in images])
    contrast = torch.empty(len(images), 1, 1, 1).uniform_(0.5, 1.0)
    return (views * contrast + 0.1 * torch.randn_like(views[:, :1])).clamp(0.0, 1.0)


def pretrain_simsiam(
    backbone: nn.Module, dataset: str, epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3,
    dim: int = 128, log: Callable[[str], None] = print,
) -> None:  # fmt: skip
    """Self-supervised SimSiam pre-training of ``backbone`` in place; the labels are never read."""
    torch.manual_seed(seed)
    images = create_dataset(dataset, "train").images
    width = backbone.out_channels
    projector = nn.Sequential(
        nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim), nn.BatchNorm1d(dim, affine=False)
    )
    predictor = nn.Sequential(nn.Linear(dim, dim // 4), nn.BatchNorm1d(dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim))

    def step(idx):
        batch = images[idx]
        z1, z2 = (projector(backbone(backbone.preprocess(simsiam_views(batch))).mean(dim=(2, 3))) for _ in range(2))
        p1, p2 = predictor(z1), predictor(z2)
        cos = F.cosine_similarity
        return -0.5 * (cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()), 0

    _run(backbone, nn.ModuleList([projector, predictor]), epochs, len(images), batch_size, lr, step, log)
