"""Grid evaluation of a probed model: shared candidate grids -> the probe's correct ones ->
attributions -> scores (the headline over its confident grids).

The same grids serve the three settings of Rao et al.: GridPG on the plain model, DiFull and
DiPart on the grid models of :mod:`evaluation.grid_models`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from evaluation.attribution import create_method
from evaluation.attribution.common import model_rows
from evaluation.attribution.folding import merged_batchnorm
from evaluation.batching import halving_batches
from evaluation.grid_models import check_setting, grid_model
from evaluation.grids import build_grids, confident_mask
from evaluation.localization import grid_pointing_game
from evaluation.metrics import METRICS
from evaluation.smoothing import NO_SMOOTHING, Smoothing, smooth
from probing.registry import unknown_name

__all__ = ["evaluate_gridpg", "explain_pairs", "explained_cells", "method_layer_pairs", "predict_probabilities"]

DI_CELLS = ("corners", "all")


def explained_cells(setting: str, grid: int, di_cells: str = "corners") -> torch.Tensor:
    """The cells explained in each grid: every cell for GridPG; for DiFull and DiPart the top-left
    and bottom-right ones, as Rao et al.'s code (``eval_only_corners``), or all with ``di_cells="all"``."""
    if di_cells not in DI_CELLS:
        raise ValueError(unknown_name("di_cells", di_cells, DI_CELLS))
    if setting == "gridpg" or di_cells == "all":
        return torch.arange(grid * grid)
    return torch.tensor([0, grid * grid - 1])


def method_layer_pairs(methods: list[str], layers: list[str]) -> list[tuple[str, str]]:
    """Every (method, layer) pair at which the method is defined, in the given order."""
    return [(m, layer) for m in methods for layer in layers if layer in create_method(m).layers]


def explain_pairs(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    pairs: list[tuple[str, str]],
    shared_activation: Callable[[str], torch.Tensor],
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    smoothing: dict[str, Smoothing],
    method_options: dict[str, dict] | None = None,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield ``(method, layer, smoothed maps)`` for every pair, layer by layer: one forward to each
    layer (``shared_activation(layer)``, the activation of ``inputs`` there) serves every method.
    ``method_options`` holds keyword arguments per method name (``{"intgrad": {"n_steps": 16}}``)."""
    for layer in dict.fromkeys(layer for _, layer in pairs):
        with torch.no_grad():
            shared = shared_activation(layer)
        for method in (m for m, l in pairs if l == layer):
            attribution = create_method(method)
            options = {"probabilities": probabilities} if attribution.uses_probabilities else {}
            options |= (method_options or {}).get(method, {})
            maps = attribution(model, inputs, targets, layer=layer, activation=shared, **options)
            yield method, layer, smooth(maps, smoothing.get(method, NO_SMOOTHING))


@torch.no_grad()
def predict_probabilities(
    model, images: torch.Tensor, probabilities: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256
) -> torch.Tensor:
    """Images in [0, 1] (N, C, H, W) -> (N, K) probabilities on the CPU."""
    device = next(model.parameters()).device
    out = [
        probabilities(model(model.preprocess(images[i : i + batch_size].to(device)))).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def evaluate_gridpg(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    methods: list[str],
    layers: list[str],
    grid: int = 2,
    n_grids: int = 32,
    confidence: float = 0.95,
    seed: int = 0,
    grids_per_batch: int = 8,
    on_rows: Callable[[tuple[str, str, str], dict[str, torch.Tensor]], None] | None = None,
    metrics: tuple[str, ...] = ("gridpg",),
    smoothing: dict[str, Smoothing] | None = None,
    on_maps: Callable[..., None] | None = None,
    di_cells: str = "corners",
    method_options: dict[str, dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Score every (method, layer) pair with the Grid Pointing Game, on each grid setting.

    Args:
        model: a ``ProbedModel`` in eval mode.
        images (Tensor): (N, C, H, W) validation images in [0, 1]; labels (N,).
        probabilities: logits -> probabilities (sigmoid for BCE probes, softmax for CE probes),
            used for the confidence filter and by the methods that use them.
        methods, layers: names from the attribution registry and the ML-Att layers; pairs where
            a method is undefined (Grad-CAM at the input) are skipped, and so are DiFull and
            DiPart for methods that explain the plain model only (``grid_models=False``: rollout,
            attention_grad, cgw1, vitcx).
        grid (int): n for n x n grids. n_grids (int): candidate grids, drawn by ``seed`` from
            the images whatever the probe (:func:`evaluation.grids.candidate_grids`). The
            candidates whose every cell the probe classifies correctly (top-1) are explained and
            scored: a rule that means the same under softmax and sigmoid, on which two probes
            are paired (:mod:`sweeps.effects`).
        confidence (float): the headline score (the paper's protocol) is the mean over the
            scored grids whose every cell's image the probe classifies with at least this
            probability. When no grid qualifies, every scored grid counts, and
            ``grids/threshold`` says 0 (it is ``confidence`` otherwise).
        metrics: grid metrics of :mod:`evaluation.metrics` (``gridpg``, ``difull``, ``dipart``),
            and metrics scored on GridPG's maps: of the maps alone (``compactness``,
            ``complexity``) or of the model's response to them (``deletion``, ``insertion``).
        smoothing: per method name, applied to the maps before scoring. Default: none.
        method_options: keyword arguments per method name (``{"lime": {"num_samples": 100}}``).
        di_cells: ``corners`` (DiFull and DiPart explain the top-left and bottom-right cells, as
            Rao et al.) or ``all``. GridPG explains every cell.
        on_maps: called per batch with ``(setting, method, layer)``, the (smoothed) maps, their
            target cells, scores, the batch's grid images (one per grid) and the rows' grid ids
            (their candidates' indices, the same for every probe), e.g. to build AggAtt figures
            and example galleries.
        grids_per_batch: grids explained together; halved when a batch runs out of GPU memory
            (logged to ``log``).
        on_rows: called once per ``(setting, method, layer)`` with its scored rows, one per
            explained cell of each grid: ``grid`` (the candidate's index), ``cell``, ``class``,
            ``image`` (its index in ``images``), ``confidence`` (the probe's probability of the
            cell's class on the cell's image alone), ``headline`` (the row counts in the headline
            score) and ``score``.

    Returns:
        ``<setting>/<method>/<layer>``: the headline score, the mean over the explained cells of
        the confident grids (absent when no grid could be built); ``grids/count`` (the confident
        grids), ``grids/scored`` (the top-1 grids explained), ``grids/candidates``,
        ``grids/threshold`` and ``grids/confident_images``.
    """
    # metrics checked before any work; map metrics score the GridPG maps (explained even when
    # GridPG itself is not asked for)
    on_maps_of_gridpg = tuple(m for m in metrics if METRICS.get(m).protocol in ("maps", "perturbation"))
    settings = tuple(m for m in metrics if m not in on_maps_of_gridpg)
    explained_settings = settings + (("gridpg",) if on_maps_of_gridpg and "gridpg" not in settings else ())
    explained = {setting: explained_cells(check_setting(setting), grid, di_cells) for setting in explained_settings}
    explained |= {m: explained["gridpg"] for m in on_maps_of_gridpg}
    smoothing = smoothing or {}
    predicted = predict_probabilities(model, images, probabilities)
    grids = build_grids(images, labels, confident_mask(predicted, labels, 0.0), grid, n_grids, seed)  # every cell top-1
    confident = confident_mask(predicted, labels, confidence)
    headline = confident[grids.images.picks].all(dim=1) if len(grids) else torch.zeros(0, dtype=torch.bool)
    threshold = confidence
    if not headline.any():  # a probe confident on no candidate (BCE probes often are): its correct top-1 grids, marked
        threshold, headline = 0.0, torch.ones(len(grids), dtype=torch.bool)
    scores_out = {
        "grids/count": float(headline.sum()), "grids/scored": float(len(grids)), "grids/candidates": float(n_grids),
        "grids/threshold": float(threshold), "grids/confident_images": float(confident.sum()),
    }  # fmt: skip
    if not len(grids):
        return scores_out
    device = next(model.parameters()).device
    pairs = method_layer_pairs(methods, layers)
    # the pairs each setting explains: methods defined on the plain model only (attention rollout)
    # are scored by GridPG and the map metrics, not on the DiFull / DiPart grid models
    setting_pairs = {s: [p for p in pairs if s == "gridpg" or create_method(p[0]).grid_models] for s in explained_settings}
    keys = [(metric, method, layer) for metric in (*settings, *on_maps_of_gridpg)
            for method, layer in setting_pairs[metric if metric in settings else "gridpg"]]  # fmt: skip
    scores: dict[tuple[str, str, str], list[torch.Tensor]] = {key: [] for key in keys}

    def score_batch(start: int, stop: int) -> list[tuple]:
        results = []
        grid_images = grids.images[start:stop].to(device)
        grid_inputs = model.preprocess(grid_images)
        for setting in explained_settings:
            chosen = explained[setting].to(device)  # the cells explained in each grid
            per_grid = len(chosen)
            inputs = grid_inputs.repeat_interleave(per_grid, dim=0)  # one row per target
            targets = grids.classes[start:stop][:, chosen.cpu()].flatten().to(device)
            cell_index = chosen.repeat(len(grid_inputs))
            ids = grids.ids[start:stop].repeat_interleave(per_grid)
            setting_model = grid_model(setting, model, grid, cell_index)
            first_rows = model_rows(setting_model, torch.arange(0, len(inputs), per_grid))

            def shared_activation(layer: str) -> torch.Tensor:  # one forward per grid serves all its targets
                with merged_batchnorm(first_rows):  # the same activation, a faster forward pass
                    return first_rows.forward_to(grid_inputs, layer).repeat_interleave(per_grid, dim=0)

            for method, layer, maps in explain_pairs(
                setting_model, inputs, targets, setting_pairs[setting], shared_activation, probabilities, smoothing, method_options
            ):
                if setting in settings:
                    score = grid_pointing_game(maps, grid, cell_index)
                    results.append(((setting, method, layer), score, maps.detach() if on_maps else None, cell_index, grid_images, ids))
                if setting == "gridpg":
                    for metric in on_maps_of_gridpg:
                        score = map_score(metric, setting_model, inputs, targets, maps.detach(), probabilities)
                        results.append(((metric, method, layer), score, None, cell_index, grid_images, ids))
        return results

    for results in halving_batches(len(grids), grids_per_batch, score_batch, "grid attributions", log):
        for key, score, maps, cell_index, grid_images, ids in results:
            scores[key].append(score.cpu())
            if on_maps is not None and maps is not None:
                on_maps(key, maps, cell_index, score, grid_images, ids)
    for (setting, method, layer), values in scores.items():
        values = torch.cat(values)
        counted = headline.repeat_interleave(len(explained[setting]))
        scores_out[f"{setting}/{method}/{layer}"] = values[counted].mean().item()
        if on_rows is not None:
            on_rows((setting, method, layer), _grid_rows(grids, explained[setting], predicted) | {"headline": counted, "score": values})
    return scores_out


def map_score(metric: str, model, inputs, targets, maps: torch.Tensor, probabilities) -> torch.Tensor:
    """(B,) score of a ``maps`` or ``perturbation`` metric on the rows' maps."""
    entry = METRICS.get(metric)
    if entry.protocol == "maps":
        return entry.score(maps)
    return entry.score(model, inputs, targets, maps, probabilities)


def _grid_rows(grids, cells: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
    """The row columns of the explained ``cells`` of every grid, in the evaluator's order (grid by
    grid, cells in order)."""
    picks = grids.images.picks[:, cells]
    classes = grids.classes[:, cells]
    return {
        "grid": grids.ids.repeat_interleave(len(cells)), "cell": cells.repeat(len(grids)),
        "class": classes.flatten(), "image": picks.flatten(), "confidence": predicted[picks.flatten(), classes.flatten()],
    }  # fmt: skip
