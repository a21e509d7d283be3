"""Box evaluation on multi-label data (VOC 2007, COCO 2014): EPG and the pointing game.

One row per (image, ground-truth class): the map for that class is scored against the union of
the class's boxes, by the Energy Pointing Game and the pointing game (15 px tolerance). Boxes
flagged difficult (VOC) or crowd (COCO) are left out, and a class with only such boxes is not
explained. As in the grid evaluation, one
backbone forward per batch and layer serves every method and every class of an image.
"""

from __future__ import annotations

from typing import Callable

import torch

from evaluation.batching import halving_batches
from evaluation.gridpg import explain_pairs, method_layer_pairs
from evaluation.localization import energy_pointing_game, pointing_game
from evaluation.metrics import METRICS, localisation_metric
from evaluation.smoothing import Smoothing

__all__ = ["box_mask", "epg_rows", "evaluate_epg"]


def box_mask(boxes: torch.Tensor, cls: int, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the pixels whose centres lie in a box of class ``cls`` that is not flagged.

    Args:
        boxes (Tensor): (M, 6) rows ``class, x0, y0, x1, y1, flag`` in pixels of the image.
    """
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for c, x0, y0, x1, y1, flag in boxes.tolist():
        if int(c) == cls and not flag:
            mask |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return mask


def epg_rows(boxes: tuple[torch.Tensor, ...], n_images: int, seed: int = 0) -> list[tuple[int, int]]:
    """(image index, class) rows: up to ``n_images`` images (seeded choice) with unflagged boxes,
    and each class that has one in them."""
    order = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, images = [], 0
    for i in order:
        classes = sorted({int(b[0]) for b in boxes[i].tolist() if not b[5]})
        if classes:
            rows += [(i, c) for c in classes]
            images += 1
            if images == n_images:
                break
    return rows


localisation_metric("epg", "boxes", "Energy Pointing Game: the share of positive attribution inside the class's boxes")(
    energy_pointing_game
)
localisation_metric("pointing_game", "boxes", "pointing game: the map's maximum within 15 px of the class's boxes (hit rate)")(
    pointing_game
)


def evaluate_epg(
    model,
    images,
    boxes: tuple[torch.Tensor, ...],
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    methods: list[str],
    layers: list[str],
    n_images: int = 64,
    seed: int = 0,
    rows_per_batch: int = 16,
    smoothing: dict[str, Smoothing] | None = None,
    on_maps: Callable | None = None,
    on_rows: Callable[[tuple[str, str, str], dict[str, torch.Tensor]], None] | None = None,
    method_options: dict[str, dict] | None = None,
    metrics: tuple[str, ...] = ("epg",),
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Mean box score (EPG, pointing game) of every (method, layer) pair over the (image, class) rows.

    Args:
        model: a ``ProbedModel`` in eval mode. images: the split's images in [0, 1] (a tensor or a
            lazy image list); boxes: the split's boxes (``probing.datasets.Split.boxes``).
        probabilities: logits -> probabilities, for the methods that use them.
        metrics: ``boxes`` metrics of :mod:`evaluation.metrics` (``epg``, ``pointing_game``), all
            scored on the same maps.
        on_maps: called per batch with ``(metrics[0], method, layer)``, the maps, the rows'
            classes, their scores, their images and their indices among the rows (the same for
            every probe).
        on_rows: called once per ``(metric, method, layer)`` with its rows: ``image`` (index in
            ``images``), ``class``, ``confidence`` (the probe's probability of the class on the
            image) and ``score``. The rows depend on the boxes and ``seed`` only: every probe of
            a data set scores the same ones.
        method_options: keyword arguments per method name (``{"intgrad": {"n_steps": 16}}``).
        rows_per_batch: rows explained together; halved when a batch runs out of GPU memory
            (logged to ``log``).

    Returns:
        ``<metric>/<method>/<layer>`` and ``epg/rows`` (the number of (image, class) rows scored).
    """
    scorers = {metric: METRICS.get(metric) for metric in metrics}
    for metric, entry in scorers.items():
        if entry.protocol != "boxes":
            raise ValueError(f"metric {metric!r} is not scored on boxes ({entry.protocol})")
    smoothing = smoothing or {}
    rows = epg_rows(boxes, n_images, seed)
    pairs = method_layer_pairs(methods, layers)
    out: dict[str, float] = {"epg/rows": float(len(rows))}
    scores: dict[tuple[str, str, str], list[torch.Tensor]] = {(m, *pair): [] for m in metrics for pair in pairs}
    confidences: list[torch.Tensor] = []
    device = next(model.parameters()).device

    def score_batch(start: int, stop: int) -> list[tuple]:
        results = []
        batch = rows[start:stop]
        unique = sorted({i for i, _ in batch})
        pictures = images[torch.tensor(unique)]
        inputs = model.preprocess(pictures.to(device))
        which = torch.tensor([unique.index(i) for i, _ in batch], device=device)
        targets = torch.tensor([c for _, c in batch], device=device)
        height, width = inputs.shape[-2:]
        masks = torch.stack([box_mask(boxes[i], c, height, width) for i, c in batch]).to(device)
        with torch.no_grad():
            confidence = probabilities(model(inputs))[which, targets].cpu()

        def shared_activation(layer: str) -> torch.Tensor:  # one forward per image serves all its classes
            return model.forward_to(inputs, layer)[which]

        for method, layer, maps in explain_pairs(
            model, inputs[which], targets, pairs, shared_activation, probabilities, smoothing, method_options
        ):
            for n, metric in enumerate(metrics):
                score = scorers[metric].score(maps, masks)
                shown = maps.detach() if on_maps and n == 0 else None  # one figure per map, not per metric
                results.append(((metric, method, layer), score, shown, targets, pictures[which.cpu()], torch.arange(start, stop)))
        return confidence, results

    for confidence, results in halving_batches(len(rows), rows_per_batch, score_batch, "EPG attributions", log):
        confidences.append(confidence)
        for key, score, maps, targets, pictures, ids in results:
            scores[key].append(score.cpu())
            if on_maps is not None and maps is not None:
                on_maps(key, maps, targets, score, pictures, ids)
    for key, values in scores.items():
        if values:
            values = torch.cat(values)
            out["/".join(key)] = values.mean().item()
            if on_rows is not None:
                image, cls = torch.tensor(rows).T
                on_rows(key, {"image": image, "class": cls, "confidence": torch.cat(confidences), "score": values})
    return out
