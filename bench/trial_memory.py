"""A probe epoch's memory: from memory-mapped feature shards (what a trial does) with 10x the rows
against 1x, and the same epochs from tensors held in memory (what trials did before the shards).

    .venv/bin/python bench/trial_memory.py [--rows 4000] [--channels 512]

Each epoch runs in a fresh process on random float16 features of (channels, 7, 7) per row (ResNet
maps), written as a sharded cache first. Memory is the process's anonymous resident memory
(``RssAnon``, sampled every 5 ms): what the trial itself needs. Pages of the mapped shards are the
kernel's page cache (``RssFile``), which it drops under pressure. Last line: the shards' ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EPOCH = """
import json, sys, threading, time
from pathlib import Path
import torch
from probing.heads import create_head
from probing.losses import create_loss
from probing.shards import ShardedFeatures, read_manifest
from probing.train import ProbeTrainer, TrainConfig

folder, in_memory = Path(sys.argv[1]), sys.argv[2] == "tensor"

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak, done = [anon_kb()], threading.Event()
def sample():
    while not done.is_set():
        peak.append(anon_kb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
features = ShardedFeatures(folder, read_manifest(folder))
if in_memory:
    features = features[:]
labels = torch.arange(len(features)) % 10
torch.manual_seed(0)
head = create_head("linear", features.shape[1], 10)
trainer = ProbeTrainer(head, create_loss("ce"), (features, labels), (features[:256], labels[:256]), TrainConfig(epochs=1, batch_size=256))
trainer.run_epoch()
done.set()
print(json.dumps({"peak_anon_mb": max(peak) / 1024}))
"""


def _cache(folder: Path, rows: int, channels: int) -> None:
    import torch

    from probing.shards import ShardLayout, write_manifest, write_shard

    folder.mkdir(parents=True)
    layout = ShardLayout(rows, 1024)
    generator = torch.Generator().manual_seed(0)
    for index in range(len(layout)):
        start, stop = layout.rows(index)
        write_shard(folder, index, torch.rand(stop - start, channels, 7, 7, generator=generator).half(), "bench")
    write_manifest(folder, layout, {"dtype": "float16"})


def _peak(folder: Path, source: str) -> float:
    out = subprocess.run([sys.executable, "-c", EPOCH, str(folder), source], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_anon_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--channels", type=int, default=512)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="trial-memory-") as work:
        for factor in (1, 10):
            folder = Path(work) / f"x{factor}"
            _cache(folder, args.rows * factor, args.channels)
            for source in ("shards", "tensor"):
                results[(source, factor)] = _peak(folder, source)
    row_mb = args.channels * 49 * 2 / 2**20
    print(f"one epoch, batch 256, linear probe; rows of {args.channels}x7x7 float16 ({row_mb * 1024:.0f} KB each)")
    print(f"{'features from':<22} {'1x rows MB':>11} {'10x rows MB':>12} {'10x / 1x':>9}")
    for source in ("shards", "tensor"):
        one, ten = results[(source, 1)], results[(source, 10)]
        print(f"{source:<22} {one:>11.0f} {ten:>12.0f} {ten / one:>8.2f}x")
    print(f"data set: {args.rows} rows ({args.rows * row_mb:.0f} MB) and {10 * args.rows} rows ({10 * args.rows * row_mb:.0f} MB)")
    print(f"trial memory, 10x data vs 1x: {results[('shards', 10)] / results[('shards', 1)]:.2f}x")


if __name__ == "__main__":
    main()
