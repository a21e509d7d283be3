"""Feature extraction: the Ray Data pipeline a sweep runs (``sweeps.extraction``) against the
single-process loop that computed the features before it, on the same synthetic ImageFolder.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295 \\
        .venv/bin/python bench/feature_extraction.py [--images 800] [--size 224] [--shard-rows 128]

JPEGs of 320 px (decoded, resized to 256 and centre-cropped to ``--size``) through a ResNet-18 with
random weights, loaded from a checkpoint file the benchmark writes. Three ways to the features of
both splits:

- baseline: the loop before the pipeline (the driver's ``prepare_caches``): one process decodes a
  batch of 256 images, runs the backbone on it in the default memory layout, and the split's
  features go to one file;
- ``probing.features.cached_features`` today, in one process: the same decoding, the backbone on
  channels-last batches of 128 (``compute_features``), checksummed shards;
- the Ray Data pipeline (``sweeps.extraction``): on CPUs one backbone actor per node, holding its
  cores, decodes each shard and runs ``compute_features`` on it (on GPUs decoding tasks feed the actors).

The pipeline's time excludes starting Ray (a sweep has it up already) and includes starting its
actors. Last line: the pipeline's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image


def _folder(root: Path, images: int, side: int = 320) -> None:
    generator = torch.Generator().manual_seed(0)
    for i in range(images):
        split = "val" if i % 5 == 0 else "train"
        pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8).numpy()
        path = root / split / f"class{i % 4}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shard-rows", type=int, default=128)
    args = parser.parse_args()

    import ray

    from probing.backbones import create_backbone
    from probing.datasets import create_dataset
    from probing.features import cached_features
    from sweeps.extraction import extract_features
    from sweeps.spec import parse_spec

    with tempfile.TemporaryDirectory(prefix="extraction-") as folder:
        work = Path(folder)
        _folder(work / "images", args.images)
        torch.manual_seed(0)
        weights = work / "resnet18-random.pth"
        torch.save(torchvision.models.resnet18().state_dict(), weights)
        spec = parse_spec({
            "name": "bench", "backbones": [{"name": "resnet18", "weights": str(weights)}],
            "data": {"dataset": "imagefolder", "root": str(work / "images"), "size": args.size},
        })  # fmt: skip
        rows = {}

        backbone = create_backbone("resnet18", log=lambda m: None, weights=str(weights))
        splits = {name: create_dataset("imagefolder", name, root=str(work / "images"), size=args.size) for name in ("train", "val")}
        start = time.perf_counter()
        with torch.no_grad():
            for name, split in splits.items():
                batches = [backbone(backbone.preprocess(split.images[i : i + 256])) for i in range(0, len(split), 256)]
                torch.save(torch.cat(batches), work / f"before-{name}.pt")
        rows["one process, default layout, one file (baseline: before the pipeline)"] = time.perf_counter() - start

        os.environ["PROBESWEEP_CACHE"] = str(work / "one-process")
        start = time.perf_counter()
        for name, split in splits.items():
            cached_features(backbone, split, "imagefolder", name, log=lambda m: None, shard_rows=args.shard_rows)
        rows["one process, channels-last batches, shards (cached_features)"] = time.perf_counter() - start

        os.environ["PROBESWEEP_CACHE"] = str(work / "pipeline")
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            start = time.perf_counter()
            extract_features(spec, log=lambda m: None, shard_rows=args.shard_rows)
            rows["Ray Data pipeline (a backbone actor per node, decoding its shards)"] = time.perf_counter() - start
        finally:
            ray.shutdown()
        difference = 0.0  # the pipeline's features against the baseline's
        for name, split in splits.items():
            before = torch.load(work / f"before-{name}.pt")
            after = cached_features(backbone, split, "imagefolder", name, log=lambda m: None, verify=False)[:]
            difference = max(difference, float((after - before).abs().max() / before.abs().max()))

    baseline = next(iter(rows.values()))
    print(f"{args.images} JPEGs of 320 px -> {args.size} px, ResNet-18 (random weights), shards of {args.shard_rows}, {os.cpu_count()} CPUs")
    print(f"{'case':<70} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    for case, seconds in rows.items():
        print(f"{case:<70} {seconds:>8.1f} {args.images / seconds:>9.1f} {baseline / seconds:>8.2f}x")
    print(f"max |pipeline - baseline| / max |baseline|: {difference:.1e}")
    print(f"feature extraction, pipeline vs one process: {baseline / rows[list(rows)[-1]]:.2f}x")


if __name__ == "__main__":
    main()
