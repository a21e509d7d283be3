"""Probe training per epoch: from the feature cache versus through the frozen backbone each epoch.

The reference code of How to Probe runs the frozen backbone on every batch of every epoch; the
cache computes the features once. Both paths here train the same head with the same
:class:`probing.train.ProbeTrainer` on the same data; only where the features come from differs.
The one-off cost of filling the cache is reported too.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295 \\
        .venv/bin/python bench/probe_cache.py [--resnet50-images 64] [--epochs 2]

Cases: the embedded demo (tiny_resnet_sup on the digits, linear head, all 1,438 train images);
a ResNet-50 at 224 px with random weights (timing only) with a pooled linear probe and a spatial
3-layer MLP (width 2048). Last line: the embedded demo's ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torchvision

from probing.datasets import create_dataset
from probing.features import compute_features
from probing.heads import create_head
from probing.losses import create_loss
from probing.train import ProbeTrainer, TrainConfig


def _seconds_per_epoch(trainer: ProbeTrainer, epochs: int) -> float:
    trainer.run_epoch()  # warm-up (allocations, oneDNN kernels)
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    return (time.perf_counter() - start) / epochs


def _compare(name, backbone, images, labels, num_classes, head_options, epochs, batch_size) -> dict:
    def trainer(inputs, embed):
        torch.manual_seed(0)
        head = create_head(in_channels=backbone.out_channels, num_classes=num_classes, **head_options)
        val = (features[:batch_size], labels[:batch_size])
        config = TrainConfig(epochs=epochs + 1, batch_size=batch_size, lr=1e-3)
        return ProbeTrainer(head, create_loss("ce"), (inputs, labels), val, config, embed=embed)

    start = time.perf_counter()
    features = compute_features(backbone, images, batch_size=batch_size)
    fill = time.perf_counter() - start

    @torch.no_grad()
    def through_backbone(batch):
        return backbone(backbone.preprocess(batch))

    cached = _seconds_per_epoch(trainer(features, None), epochs)
    naive = _seconds_per_epoch(trainer(images, through_backbone), epochs)
    return {"case": name, "n": len(images), "fill": fill, "cache": cached, "backbone": naive, "ratio": naive / cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resnet50-images", type=int, default=64, help="images in the ResNet-50 cases")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per path (after one warm-up epoch)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.setdefault("PROBESWEEP_CACHE", tempfile.mkdtemp(prefix="probesweep-bench-"))

    from probing.backbones import create_backbone

    rows = []
    train = create_dataset("digits", "train")
    tiny = create_backbone("tiny_resnet_sup", log=lambda m: None)
    rows.append(_compare("embedded demo: tiny_resnet_sup, linear", tiny, train.images, train.labels, 10,
                         {"name": "linear"}, args.epochs, 256))  # fmt: skip

    torch.manual_seed(0)
    from probing.zoo import staged_backbone

    resnet = staged_backbone("resnet50", torchvision.models.resnet50()).eval().requires_grad_(False)
    resnet = resnet.to(memory_format=torch.channels_last)
    n = args.resnet50_images
    images = torch.rand(n, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(n) % 10
    rows.append(_compare("ResNet-50 224 px, pooled linear", resnet, images, labels, 10,
                         {"name": "linear", "input": "pooled"}, args.epochs, 32))  # fmt: skip
    rows.append(_compare("ResNet-50 224 px, spatial MLP d3 w2048", resnet, images, labels, 10,
                         {"name": "mlp", "depth": 3, "width": 2048}, args.epochs, 32))  # fmt: skip

    print(f"\nProbe training, seconds per epoch (baseline: through the frozen backbone each epoch), {torch.get_num_threads()} threads")
    print(f"{'case':42} {'images':>6} {'fill cache':>10} {'backbone':>10} {'cache':>10} {'ratio':>8}")
    for r in rows:
        print(f"{r['case']:42} {r['n']:>6} {r['fill']:>9.2f}s {r['backbone']:>9.3f}s {r['cache']:>9.4f}s {r['ratio']:>7.1f}x")
    print(f"probe epoch, cache vs backbone: {rows[0]['ratio']:.1f}x")


if __name__ == "__main__":
    main()
