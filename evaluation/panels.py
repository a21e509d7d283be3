"""Figures of many image panels, drawn as one image.

A matplotlib Axes per panel, laid out by constrained layout, made a trial's AggAtt and example
figures cost 0.25-0.6 s each on a 2-core machine and a sweep's side-by-side comparison of 24
probes 5 s. Here the panels are composed into one RGB array shown by one Axes, with titles,
labels and captions as text at computed places: 3.4-6.6x faster (``bench/figures.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Panel", "heat_rgb", "overlay_rgb", "panel_boxes", "compose", "panel_figure", "OVERLAY_ALPHA", "EMPTY_GREY"]

GAP = 0.08  # between panels, a fraction of the panel's side
CAPTION = 0.16  # room under each panel for its caption, a fraction of the panel's height
EMPTY_GREY = 0.94  # the background of a panel that says why it is empty
OVERLAY_ALPHA = 0.6  # the heat map's opacity over its image


@dataclass(frozen=True)
class Panel:
    """One panel: ``rgb`` (H, W, 3) in [0, 1], or None for an empty panel that shows ``note``
    (nothing at all when ``note`` is empty); ``caption`` goes under it; ``cells``: outline the
    cells of a ``cells`` x ``cells`` grid image."""

    rgb: np.ndarray | None = None
    note: str = ""
    caption: str = ""
    cells: int | None = None


def heat_rgb(values, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """(H, W) values on the scale [0, vmax] (clipped) as colour-mapped RGB."""
    import matplotlib

    scaled = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0)
    return matplotlib.colormaps[cmap](scaled)[..., :3]


def overlay_rgb(image, heat, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """An (H, W, 3) image in [0, 1] under a heat map in [0, 1] of opacity ``alpha``."""
    return (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat_rgb(heat, 1.0)


def panel_boxes(rows: int, columns: int, height: int, width: int, captions: bool) -> tuple[tuple[int, int], list[list[tuple[int, int]]]]:
    """The composed image's (height, width) and each panel's top-left (y, x) in it."""
    gap_x = max(1, round(GAP * width))
    gap_y = max(1, round(GAP * height)) + (round(CAPTION * height) if captions else 0)
    corners = [[(r * (height + gap_y), c * (width + gap_x)) for c in range(columns)] for r in range(rows)]
    return (rows * (height + gap_y) - gap_y, columns * (width + gap_x) - gap_x), corners


def _size(panels: list[list[Panel]]) -> tuple[int, int]:
    shapes = [p.rgb.shape[:2] for row in panels for p in row if p.rgb is not None]
    return max((s[0] for s in shapes), default=32), max((s[1] for s in shapes), default=32)


def _resized(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    rows = np.arange(height) * rgb.shape[0] // height  # nearest: a panel of another size keeps its pixels
    return rgb[rows][:, np.arange(width) * rgb.shape[1] // width]


def compose(panels: list[list[Panel]]) -> tuple[np.ndarray, list[list[tuple[int, int]]], tuple[int, int]]:
    """The panels (a list of rows) in one white RGB image; returns it, each panel's top-left
    corner and the panels' common (height, width) (a panel of another size is resized to it)."""
    height, width = _size(panels)
    captions = any(p.caption for row in panels for p in row)
    shape, corners = panel_boxes(len(panels), max(map(len, panels)), height, width, captions)
    image = np.ones((*shape, 3))
    for row, row_corners in zip(panels, corners):
        for panel, (y, x) in zip(row, row_corners):
            if panel.rgb is not None:
                image[y : y + height, x : x + width] = _resized(panel.rgb, height, width)
            elif panel.note:
                image[y : y + height, x : x + width] = EMPTY_GREY
    return image, corners, (height, width)


def panel_figure(
    panels: list[list[Panel]],
    column_titles=(),
    row_labels=(),
    title: str = "",
    colorbar: tuple[str, float] | None = None,
    panel_inches: float = 1.45,
):
    """A matplotlib figure of ``panels`` (rows of :class:`Panel`) as one image, with a title per
    column above it, a label per row left of it and ``colorbar`` = (label, vmax): an inferno
    scale [0, vmax] to its right."""
    import matplotlib

    matplotlib.use("Agg")  # no display on Ray workers
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    image, corners, (height, width) = compose(panels)
    inch = panel_inches / width  # inches per pixel of the composed image
    left = 0.1 + (0.08 * max(map(len, map(str, row_labels))) + 0.1 if row_labels else 0)
    top = 0.1 + (0.3 if title else 0) + (0.14 * (1 + max(str(t).count("\n") for t in column_titles)) if column_titles else 0)
    right = 1.0 if colorbar else 0.1
    bottom = 0.1 + (0.15 if any(p.caption for p in panels[-1]) else 0)  # the last row's captions
    # a title wider than the panels widens the figure on both sides (about 0.075 in a character at 9 pt)
    widen = max(0.0, 0.075 * max(map(len, title.splitlines()), default=0) + 0.2 - (left + image.shape[1] * inch + right))
    left, right = left + widen / 2, right + widen / 2
    fig_w, fig_h = left + image.shape[1] * inch + right, top + image.shape[0] * inch + bottom
    figure = plt.figure(figsize=(fig_w, fig_h))
    ax = figure.add_axes((left / fig_w, bottom / fig_h, image.shape[1] * inch / fig_w, image.shape[0] * inch / fig_h))
    ax.imshow(image, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    segments = []
    for row, row_corners in zip(panels, corners):
        for panel, (y, x) in zip(row, row_corners):
            centre = x + (width - 1) / 2
            if panel.rgb is None and panel.note:
                ax.text(centre, y + (height - 1) / 2, panel.note, ha="center", va="center", fontsize=7, color="0.4")
            if panel.caption:
                ax.text(centre, y + height - 0.5, panel.caption, ha="center", va="top", fontsize=7)
            for k in range(1, (panel.cells or 1) if panel.rgb is not None else 1):
                segments.append([(x - 0.5, y + k * height / panel.cells - 0.5), (x + width - 0.5, y + k * height / panel.cells - 0.5)])
                segments.append([(x + k * width / panel.cells - 0.5, y - 0.5), (x + k * width / panel.cells - 0.5, y + height - 0.5)])
    if segments:
        ax.add_collection(LineCollection(segments, colors="white", linewidths=0.6, alpha=0.7))
    for name, (_, x) in zip(column_titles, corners[0]):
        ax.text(x + (width - 1) / 2, -0.5 - 0.04 * height, str(name), ha="center", va="bottom", fontsize=8)
    for label, row_corners in zip(row_labels, corners):
        ax.text(-0.5 - 0.06 * width, row_corners[0][0] + (height - 1) / 2, str(label), ha="right", va="center", fontsize=8)
    if colorbar is not None:
        label, vmax = colorbar
        span = image.shape[0] * inch
        cax = figure.add_axes(((fig_w - right + 0.15) / fig_w, (bottom + 0.15 * span) / fig_h, 0.12 / fig_w, 0.7 * span / fig_h))
        scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, max(vmax, 1e-12)), cmap="inferno")
        figure.colorbar(scale, cax=cax, label=label)
        cax.yaxis.label.set_size(8)
        cax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.08 / fig_h, va="top")
    return figure
