"""EPG, ours vs Quantus: the same 256 maps of 224 px, equal values, and the time each takes.

Ours is ``evaluation.localization.energy_pointing_game`` (one batched tensor expression);
Quantus' ``AttributionLocalisation`` with normalisation and abs turned off computes the same
score (positive attribution inside the mask over all positive attribution) one map at a time
(Quantus is a test-only dependency: ``make test`` installs it).

    .venv/bin/python bench/metrics_vs_quantus.py [--maps 256] [--size 224] [--repeats 5]

Last line: ``EPG, ours vs Quantus: <Quantus time / our time>x``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def inputs(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed maps with smooth structure, and one box-shaped mask per map (a class's boxes)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, size // 16, size // 16, generator=generator)
    maps = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps + 0.1 * torch.randn(n, size, size, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    corners = torch.randint(0, size // 2, (n, 2), generator=generator)
    sides = torch.randint(size // 8, size // 2, (n, 2), generator=generator)
    for b, ((y, x), (h, w)) in enumerate(zip(corners.tolist(), sides.tolist())):
        masks[b, y : y + h, x : x + w] = True
    return maps, masks


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maps", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs each")
    args = parser.parse_args()

    import quantus

    from evaluation.localization import energy_pointing_game

    maps, masks = inputs(args.maps, args.size)
    metric = quantus.AttributionLocalisation(positive_attributions=True, abs=False, normalise=False, disable_warnings=True)
    a_batch, s_batch = maps[:, None].numpy(), masks[:, None].numpy().astype(float)

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metric(
                model=None, x_batch=np.zeros((args.maps, 1, args.size, args.size), dtype=np.float32),
                y_batch=np.zeros(args.maps, dtype=int), a_batch=a_batch, s_batch=s_batch,
            )  # fmt: skip

    ours_s, ours = best_of(args.repeats, lambda: energy_pointing_game(maps, masks))
    theirs_s, reference = best_of(args.repeats, theirs)
    difference = (ours.double() - torch.tensor(reference, dtype=torch.float64)).abs().max().item()
    print(f"{args.maps} maps of {args.size} px, best of {args.repeats}; largest |ours - Quantus| = {difference:.2e}")
    print("| implementation | ms per map | vs Quantus |")
    print("|---|---|---|")
    for name, seconds in (("Quantus AttributionLocalisation (baseline)", theirs_s), ("ours, batched", ours_s)):
        print(f"| {name} | {1000 * seconds / args.maps:.3f} | {theirs_s / seconds:.1f}x |")
    if difference > 1e-6:
        raise SystemExit(f"the values differ by {difference:.2e}")
    print(f"EPG, ours vs Quantus: {theirs_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
