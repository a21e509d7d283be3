"""EPG evaluation on multi-label data with boxes (VOC 2007, COCO 2014).

One row per (image, ground-truth class): the map for that class is scored by the Energy Pointing
Game against the union of the class's boxes. Boxes flagged difficult (VOC) or crowd (COCO) are
left out, and a class with only such boxes is not explained. As in the grid evaluation, one
backbone forward per batch and layer serves every method and every class of an image.
"""

from __future__ import annotations

from typing import Callable

import torch

from evaluation.batching import halving_batches
from evaluation.gridpg import explain_pairs, method_layer_pairs
from evaluation.localization import energy_pointing_game
from evaluation.metrics import localisation_metric
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


@localisation_metric("epg", "boxes", "Energy Pointing Game: the share of positive attribution inside the class's boxes")
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
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Mean EPG of every (method, layer) pair over the (image, class) rows.

    Args:
        model: a ``ProbedModel`` in eval mode. images: the split's images in [0, 1] (a tensor or a
            lazy image list); boxes: the split's boxes (``probing.datasets.Split.boxes``).
        probabilities: logits -> probabilities, for the methods that use them.
        on_maps: called per batch with ``("epg", method, layer)``, the maps, the rows' classes,
            their scores, their images and their indices among the rows (the same for every probe).
        on_rows: called once per ``("epg", method, layer)`` with its rows: ``image`` (index in
            ``images``), ``class``, ``confidence`` (the probe's probability of the class on the
            image) and ``score``. The rows depend on the boxes and ``seed`` only: every probe of
            a data set scores the same ones.
        method_options: keyword arguments per method name (``{"intgrad": {"n_steps": 16}}``).
        rows_per_batch: rows explained together; halved when a batch runs out of GPU memory
            (logged to ``log``).

    Returns:
        ``epg/<method>/<layer>`` and ``epg/rows`` (the number of (image, class) rows scored).
    """
    smoothing = smoothing or {}
    rows = epg_rows(boxes, n_images, seed)
    pairs = method_layer_pairs(methods, layers)
    metrics: dict[str, float] = {"epg/rows": float(len(rows))}
    scores: dict[tuple[str, str], list[torch.Tensor]] = {pair: [] for pair in pairs}
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
            score = energy_pointing_game(maps, masks)
            results.append(((method, layer), score, maps.detach() if on_maps else None, targets, pictures[which.cpu()], torch.arange(start, stop)))
        return confidence, results

    for confidence, results in halving_batches(len(rows), rows_per_batch, score_batch, "EPG attributions", log):
        confidences.append(confidence)
        for (method, layer), score, maps, targets, pictures, ids in results:
            scores[(method, layer)].append(score.cpu())
            if on_maps is not None:
                on_maps(("epg", method, layer), maps, targets, score, pictures, ids)
    for (method, layer), values in scores.items():
        if values:
            values = torch.cat(values)
            metrics[f"epg/{method}/{layer}"] = values.mean().item()
            if on_rows is not None:
                image, cls = torch.tensor(rows).T
                on_rows(("epg", method, layer), {"image": image, "class": cls, "confidence": torch.cat(confidences), "score": values})
    return metrics
