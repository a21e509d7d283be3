"""Panel figures: one composed image vs a matplotlib Axes per panel.

A trial draws an AggAtt figure and an example gallery per (metric, method, layer); a sweep's
summary draws each (metric, method, layer)'s AggAtt bins and examples side by side for up to 24
probes. Until 2026-12-02 every panel was an Axes of its own, laid out by constrained layout
(the baseline, re-created here as it was); now the panels are composed into one image shown by
one Axes (``evaluation.panels``). Both draw the same panels from the same maps and save a PNG
as MLflow's ``log_figure`` does; each case is timed as the mean of ``--repeats`` runs, in one
process, after one warm-up of each.

    .venv/bin/python bench/figures.py [--repeats 3]   # about a minute

Last line: ``figures, one image vs an Axes per panel: <baseline time / composed time>x`` over
all cases together.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.aggatt import aggatt_bins, aggatt_figure, comparison_figure, heatmap_gallery  # noqa: E402


def axes_per_panel(maps: list[list[torch.Tensor | None]], vmax: float, title: str):
    """The baseline: a grid of Axes, one imshow per panel, titled, labelled and laid out by
    constrained layout, with one colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(maps), len(maps[0])
    figure, axes = plt.subplots(rows, columns, figsize=(1.45 * columns + 1.2, 1.45 * rows + 0.6), squeeze=False, layout="constrained")
    shown = None
    for r, row in enumerate(maps):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.text(0.5, 0.5, "no maps", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                continue
            shown = ax.imshow(image.numpy(), cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.axhline(image.shape[0] / 2 - 0.5, color="white", lw=0.6, alpha=0.7)
            ax.axvline(image.shape[1] / 2 - 0.5, color="white", lw=0.6, alpha=0.7)
            if r == 0:
                ax.set_title(f"probe {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"bin {r}", fontsize=8)
    if shown is not None:
        figure.colorbar(shown, ax=axes, label="attribution", shrink=0.7)
    figure.suptitle(title, fontsize=9)
    return figure


def saved(figure) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(io.BytesIO(), format="png")  # as MLflow's log_figure saves it
    plt.close(figure)


def timed(draw, repeats: int) -> float:
    saved(draw())  # warm-up: fonts, caches
    start = time.perf_counter()
    for _ in range(repeats):
        saved(draw())
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    side = 64  # the embedded data's grid images; stored maps are at most 128 px a side

    def bins() -> object:
        return aggatt_bins(torch.rand(60, side, side, generator=generator), torch.rand(60, generator=generator))

    images, maps, scores = torch.rand(8, 3, side, side, generator=generator), torch.rand(8, side, side, generator=generator), torch.rand(8, generator=generator)
    trial_bins = bins()
    sweep = {n: [(f"probe-{k}", bins()) for k in range(n)] for n in (4, 24)}
    cases = [
        ("a trial's AggAtt (1 x 6 panels)", lambda: axes_per_panel([list(trial_bins.maps)], trial_bins.vmax, "t"), lambda: aggatt_figure(trial_bins, "t", grid=2)),
        ("a trial's examples (2 x 4 panels)", lambda: axes_per_panel([list(maps[:4]), list(maps[4:])], 1.0, "t"), lambda: heatmap_gallery(images, maps, scores, "t")),
    ]
    for n, probes in sweep.items():
        columns = [[m / a.vmax for m in a.maps] for _, a in probes]
        cases.append((f"a sweep's AggAtt, {n} probes (6 x {n} panels)", lambda columns=columns: axes_per_panel([list(r) for r in zip(*columns)], 1.0, "t"),
                      lambda probes=probes: comparison_figure(probes, "t", grid=2)))  # fmt: skip
    print(f"| figure | an Axes per panel (baseline) s | one image s | ratio |\n|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, baseline, composed in cases:
        before, after = timed(baseline, args.repeats), timed(composed, args.repeats)
        totals[0] += before
        totals[1] += after
        print(f"| {name} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
    print(f"| all together | {totals[0]:.3f} | {totals[1]:.3f} | {totals[0] / totals[1]:.1f}x |")
    print(f"figures, one image vs an Axes per panel: {totals[0] / totals[1]:.1f}x")


if __name__ == "__main__":
    main()
