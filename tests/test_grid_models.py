"""DiFull and DiPart: constructions checked by hand, and the sanity results they must give."""

import pytest
import torch

from evaluation.attribution import create_method
from evaluation.grid_models import DiFullModel, DiPartModel, crop_cells, grid_model, join_cells, split_cells
from evaluation.gridpg import evaluate_gridpg
from evaluation.localization import grid_pointing_game
from probing.backbones import create_backbone
from probing.embedded_backbones import tiny_resnet
from probing.datasets import create_dataset
from probing.features import cached_features
from probing.heads import create_head
from probing.losses import create_loss
from probing.model import ProbedModel
from probing.train import ProbeTrainer, TrainConfig


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    backbone = tiny_resnet().eval().requires_grad_(False)
    head = create_head("linear", backbone.out_channels, 10).eval().requires_grad_(False)
    return ProbedModel(backbone, head).double()


@pytest.fixture(scope="module")
def grid_batch():
    generator = torch.Generator().manual_seed(2)
    grids = torch.rand(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    inputs = grids.repeat_interleave(4, dim=0)  # one row per (grid, cell)
    return inputs, torch.arange(4).repeat(2), torch.tensor([1, 4, 7, 2, 0, 9, 3, 5])


def test_split_join_and_crop_cells():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    cells = split_cells(x, 2)
    assert cells.shape == (8, 1, 2, 2)
    assert torch.equal(cells[1, 0], x[0, 0, 0:2, 2:4]) and torch.equal(cells[6, 0], x[1, 0, 2:4, 0:2])
    assert torch.equal(join_cells(cells, 2), x)
    assert torch.equal(crop_cells(x, 2, torch.tensor([3, 2])), torch.stack([x[0, :, 2:4, 2:4], x[1, :, 2:4, 0:2]]))


def test_difull_logits_are_those_of_the_cell_alone(random_model, grid_batch):
    inputs, cells, _ = grid_batch
    logits = DiFullModel(random_model, 2, cells)(inputs)
    alone = random_model(crop_cells(inputs, 2, cells))
    torch.testing.assert_close(logits, alone)


def test_dipart_crops_the_final_map_of_the_whole_grid(random_model, grid_batch):
    inputs, cells, _ = grid_batch
    logits = DiPartModel(random_model, 2, cells)(inputs)
    features = random_model.backbone(inputs)  # (8, 64, 16, 16): the whole grid
    expected = torch.stack(
        [random_model.head(features[b : b + 1, :, 8 * (k // 2) : 8 * (k // 2) + 8, 8 * (k % 2) : 8 * (k % 2) + 8])[0]
         for b, k in enumerate(cells.tolist())]
    )
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, DiFullModel(random_model, 2, cells)(inputs))  # context reaches the cell


@pytest.mark.parametrize("method", ["ixg", "intgrad", "gbp"])
def test_gradient_methods_at_the_input_attribute_nothing_outside_the_cell_on_difull(random_model, grid_batch, method):
    inputs, cells, targets = grid_batch
    x = random_model.preprocess(inputs)
    maps = create_method(method)(DiFullModel(random_model, 2, cells), x, targets, layer="input")
    inside = torch.zeros_like(maps, dtype=torch.bool)
    for b, k in enumerate(cells.tolist()):
        inside[b, 32 * (k // 2) : 32 * (k // 2) + 32, 32 * (k % 2) : 32 * (k % 2) + 32] = True
    assert (maps[~inside] == 0).all() and (maps[inside] != 0).any()
    scores = grid_pointing_game(maps, 2, cells)
    has_positive = maps.clamp(min=0).flatten(1).sum(1) > 0
    torch.testing.assert_close(scores[has_positive], torch.ones(int(has_positive.sum()), dtype=scores.dtype))


def test_grid_models_refuse_a_batch_of_the_wrong_size(random_model, grid_batch):
    inputs, cells, _ = grid_batch
    with pytest.raises(ValueError, match="DiFullModel explains 8 rows, got a batch of 3"):
        DiFullModel(random_model, 2, cells)(inputs[:3])
    doubled = DiFullModel(random_model, 2, cells)(torch.cat([inputs, inputs]))  # k*B rows: cells repeat
    torch.testing.assert_close(doubled, torch.cat([DiFullModel(random_model, 2, cells)(inputs)] * 2))


@pytest.fixture(scope="module")
def trained_probe():
    """The embedded backbone with a briefly trained CE linear probe (confident on most digits)."""
    backbone = create_backbone("tiny_resnet_sup", log=lambda m: None)
    train, val = create_dataset("digits", "train"), create_dataset("digits", "val")
    features = {s: cached_features(backbone, d, "digits", s, log=lambda m: None) for s, d in (("train", train), ("val", val))}
    torch.manual_seed(0)
    head = create_head("linear", backbone.out_channels, 10)
    trainer = ProbeTrainer(head, create_loss("ce"), (features["train"], train.labels), (features["val"], val.labels),
                           TrainConfig(epochs=5, lr=1e-2))
    for _ in range(5):
        trainer.run_epoch()
    return ProbedModel(backbone, head.eval()), val


def test_evaluation_on_all_three_settings(trained_probe):
    model, val = trained_probe
    metrics = evaluate_gridpg(
        model, val.images, val.labels, lambda z: z.softmax(dim=1), methods=["ixg", "gradcam"],
        layers=["input", "final"], n_grids=4, confidence=0.5, metrics=("gridpg", "difull", "dipart"),
    )
    assert metrics["grids/count"] == 4
    assert metrics["difull/ixg/input"] == pytest.approx(1.0)  # provably local: a correct method scores 1
    assert metrics["gridpg/ixg/input"] < 1.0 and metrics["difull/gradcam/final"] < 1.0
    assert {"dipart/ixg/input", "dipart/ixg/final", "dipart/gradcam/final"} <= metrics.keys()


def test_unknown_setting_is_named(trained_probe):
    model, val = trained_probe
    with pytest.raises(ValueError, match="unknown metric 'difill': known are compactness, complexity, deletion, difull, dipart, epg, gridpg, insertion, pointing_game; did you mean 'difull'"):
        evaluate_gridpg(model, val.images, val.labels, torch.sigmoid, ["ixg"], ["input"], metrics=("difill",))
    with pytest.raises(ValueError, match="unknown localisation setting 'epg': known are difull, dipart, gridpg"):
        evaluate_gridpg(model, val.images, val.labels, torch.sigmoid, ["ixg"], ["input"], metrics=("epg",))  # not a grid metric


def test_full_pipeline_on_3x3_grids_with_every_method_layer_and_setting(trained_probe):
    """Every registered method at every layer where it is defined, on GridPG, DiFull and DiPart
    3x3 grids; maps from the shared per-layer forward equal each method called on its own."""
    from evaluation.attribution import list_methods
    from evaluation.attribution.common import model_traits

    model, val = trained_probe
    kept = {}

    def keep(key, maps, cells, scores, images, ids):
        kept.setdefault(key, []).append(maps)

    # cheap settings, the same code paths: IntGrad's steps, LIME's samples and RISE's masks only repeat the forward passes
    # and Occlusion's windows do not overlap (36 windows of a 96 px grid instead of 121)
    cheap = {"intgrad": {"n_steps": 8}, "lime": {"num_samples": 40, "batch_size": 40}, "rise": {"n_masks": 64}, "occlusion": {"stride": 16}}
    methods = [m for m in list_methods() if not create_method(m).refusal(model_traits(model))]  # (ViT methods: the ViT's tests)
    metrics = evaluate_gridpg(
        model, val.images, val.labels, lambda z: z.softmax(dim=1), methods=methods,
        layers=["input", "middle", "final"], grid=3, n_grids=1, confidence=0.5, metrics=("gridpg", "difull", "dipart"),
        on_maps=keep, method_options=cheap,
    )  # fmt: skip
    assert metrics["grids/count"] == 1  # one grid: its 9 targets share each forward (batches of grids: other tests)
    expected_keys = {
        f"{s}/{m}/{layer}" for s in ("gridpg", "difull", "dipart") for m in methods for layer in create_method(m).layers
    }  # fmt: skip
    assert expected_keys <= metrics.keys() and all(0.0 <= metrics[k] <= 1.0 for k in expected_keys)
    for method in ("ixg", "intgrad", "gbp", "bcos", "lrp"):  # provably local at the input on DiFull
        assert metrics[f"difull/{method}/input"] == pytest.approx(1.0), method

    grids = kept[("gridpg", "ixg", "input")][0]
    assert grids.shape == (9, 96, 96)  # 9 targets, 3x3 cells of 32 px
    assert kept[("difull", "ixg", "input")][0].shape == (2, 96, 96)  # DiFull: the 2 corner cells
    for setting in ("gridpg", "difull"):
        inputs, targets, cells = _grid_rows(model, val, grid=3, n_grids=1, setting=setting)
        explained = grid_model(setting, model, 3, cells)
        for method, layer in (("ixg", "middle"), ("gradcam", "final"), ("lrp", "final"), ("occlusion", "middle")):
            alone = create_method(method)(explained, inputs, targets, layer=layer, **cheap.get(method, {}))
            scale = alone.abs().max().item()  # float32 rounding, relative to the map (the shared forward folds BatchNorm)
            torch.testing.assert_close(kept[(setting, method, layer)][0], alone, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def _grid_rows(model, val, grid, n_grids, setting="gridpg"):
    """The evaluator's first batch of rows, rebuilt: inputs repeated per target, targets, cells
    (every cell for GridPG; the top-left and bottom-right ones for DiFull and DiPart)."""
    from evaluation.gridpg import predict_probabilities
    from evaluation.grids import build_grids, confident_mask

    confident = confident_mask(predict_probabilities(model, val.images, lambda z: z.softmax(dim=1)), val.labels, 0.5)
    grids = build_grids(val.images, val.labels, confident, grid, n_grids, 0)
    cells = torch.arange(grid * grid) if setting == "gridpg" else torch.tensor([0, grid * grid - 1])
    inputs = model.preprocess(grids.images[:]).repeat_interleave(len(cells), dim=0)
    return inputs, grids.classes[:, cells].flatten(), cells.repeat(len(grids))


@pytest.mark.parametrize("di_cells, expected", [("corners", [0, 8]), ("all", list(range(9)))])
def test_difull_and_dipart_explain_the_corner_cells_as_rao_et_al_unless_asked_for_all(trained_probe, di_cells, expected):
    model, val = trained_probe
    seen = {}

    def keep(key, maps, cells, scores, images, ids):
        seen.setdefault(key[0], []).append(cells.tolist())

    evaluate_gridpg(
        model, val.images, val.labels, lambda z: z.softmax(dim=1), methods=["ixg"], layers=["final"], grid=3,
        n_grids=2, confidence=0.5, metrics=("gridpg", "difull", "dipart"), on_maps=keep, di_cells=di_cells,
    )  # fmt: skip
    assert seen["gridpg"] == [list(range(9)) * 2]  # GridPG: every cell, whatever di_cells says
    assert seen["difull"] == seen["dipart"] == [expected * 2]


def test_a_batch_out_of_gpu_memory_is_halved_and_retried_with_a_log_line_and_the_same_scores(trained_probe, monkeypatch):
    """On CUDA an attribution batch may not fit: it is retried at half the size (a log line says
    so), no grid is scored twice, and the scores are those of batches that fit."""
    import evaluation.gridpg as gridpg

    model, val = trained_probe
    settings = dict(methods=["ixg", "gradcam"], layers=["input", "final"], grid=2, n_grids=6, confidence=0.5, metrics=("gridpg", "difull"))
    fitting = evaluate_gridpg(model, val.images, val.labels, torch.sigmoid, grids_per_batch=1, **settings)
    assert fitting["grids/count"] == 6
    explain_pairs = gridpg.explain_pairs

    def small_memory(model, inputs, *args):
        if len(inputs) > 8:  # rows: 4 per grid for GridPG on 2x2 grids; 2 grids fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        yield from explain_pairs(model, inputs, *args)

    monkeypatch.setattr(gridpg, "explain_pairs", small_memory)
    lines, rows = [], []
    halved = evaluate_gridpg(
        model, val.images, val.labels, torch.sigmoid, grids_per_batch=8, log=lines.append,
        on_maps=lambda key, maps, cells, scores, images, ids: rows.append((key, len(scores))), **settings,
    )  # fmt: skip
    assert lines == [
        "grid attributions: out of GPU memory at 6 per batch; retrying with 4",
        "grid attributions: out of GPU memory at 4 per batch; retrying with 2",
    ]
    assert halved == pytest.approx(fitting, rel=1e-5, abs=1e-6)
    # each grid's rows reached on_maps once: 6 grids x 4 cells (GridPG) and x 2 corners (DiFull), per pair
    assert sum(n for (setting, *_), n in rows if setting == "gridpg") == 6 * 4 * 3
    assert sum(n for (setting, *_), n in rows if setting == "difull") == 6 * 2 * 3


def test_every_scored_cell_is_a_row_with_its_grid_class_image_and_the_probes_confidence(trained_probe):
    """Rows for every grid the probe classifies correctly; the headline score is the mean over
    the rows of the grids it is confident on (``headline``)."""
    from evaluation.gridpg import predict_probabilities
    from evaluation.grids import build_grids, confident_mask

    model, val = trained_probe
    softmax = lambda z: z.softmax(dim=1)  # noqa: E731
    rows = {}
    metrics = evaluate_gridpg(
        model, val.images, val.labels, softmax, methods=["ixg"], layers=["input", "final"], n_grids=12,
        confidence=0.6, metrics=("gridpg", "difull"), on_rows=lambda key, columns: rows.setdefault(key, columns),
    )  # fmt: skip
    predicted = predict_probabilities(model, val.images, softmax)
    scored = build_grids(val.images, val.labels, confident_mask(predicted, val.labels, 0.0), 2, 12, 0)
    confident = build_grids(val.images, val.labels, confident_mask(predicted, val.labels, 0.6), 2, 12, 0)
    assert metrics["grids/count"] == len(confident) > 0 and metrics["grids/threshold"] == 0.6 and metrics["grids/candidates"] == 12
    assert metrics["grids/scored"] == len(scored) >= len(confident)
    assert set(rows) == {(s, "ixg", layer) for s in ("gridpg", "difull") for layer in ("input", "final")}
    for (setting, method, layer), columns in rows.items():
        cells = [0, 1, 2, 3] if setting == "gridpg" else [0, 3]
        assert columns["grid"].tolist() == [g for g in scored.ids.tolist() for _ in cells]
        assert columns["cell"].tolist() == cells * len(scored)
        assert torch.equal(columns["image"], scored.images.picks[:, cells].flatten())
        assert torch.equal(columns["class"], val.labels[columns["image"]])
        assert torch.equal(columns["confidence"], predicted[columns["image"], columns["class"]])
        headline = columns["headline"]
        assert columns["grid"][headline].unique().tolist() == confident.ids.tolist()
        assert (columns["confidence"][headline] >= 0.6).all()
        assert columns["score"][headline].mean().item() == pytest.approx(metrics[f"{setting}/{method}/{layer}"])


def test_a_probe_confident_on_no_candidate_scores_its_correct_grids_and_says_so(trained_probe):
    """Not a blank and not 0: the grids whose every cell is classified correctly, with
    ``grids/threshold`` 0 where the spec's confidence gave none."""
    model, val = trained_probe
    settings = dict(methods=["ixg"], layers=["input"], n_grids=8)
    unreachable = evaluate_gridpg(model, val.images, val.labels, lambda z: z.softmax(dim=1) * 0.5, confidence=0.6, **settings)
    top1 = evaluate_gridpg(model, val.images, val.labels, lambda z: z.softmax(dim=1), confidence=1e-9, **settings)
    assert unreachable["grids/threshold"] == 0.0 and unreachable["grids/confident_images"] == 0
    assert unreachable["grids/count"] == unreachable["grids/scored"] == top1["grids/count"] > 0
    assert unreachable["gridpg/ixg/input"] == pytest.approx(top1["gridpg/ixg/input"])


def test_map_metrics_score_the_gridpg_maps_with_or_without_gridpg(trained_probe):
    from evaluation.map_metrics import compactness, complexity

    model, val = trained_probe
    softmax = lambda z: z.softmax(dim=1)  # noqa: E731
    settings = dict(methods=["ixg"], layers=["input"], n_grids=6, confidence=0.6)
    maps, ids, rows = [], [], {}

    def keep(key, m, cells, scores, images, grid_ids):
        maps.append(m)
        ids.append(grid_ids)

    both = evaluate_gridpg(
        model, val.images, val.labels, softmax, metrics=("gridpg", "compactness", "complexity"),
        on_maps=keep, on_rows=lambda key, columns: rows.setdefault(key, columns), **settings,
    )  # fmt: skip
    assert torch.equal(torch.cat(ids), rows[("gridpg", "ixg", "input")]["grid"])  # each map's row: its candidate grid
    alone = evaluate_gridpg(model, val.images, val.labels, softmax, metrics=("compactness",), **settings)
    assert "gridpg/ixg/input" not in alone and alone["compactness/ixg/input"] == pytest.approx(both["compactness/ixg/input"])
    maps = torch.cat(maps)  # the GridPG maps only: map metrics add no AggAtt
    headline = rows[("compactness", "ixg", "input")]["headline"]
    assert len(maps) == len(headline) and torch.equal(rows[("gridpg", "ixg", "input")]["grid"], rows[("compactness", "ixg", "input")]["grid"])
    assert both["compactness/ixg/input"] == pytest.approx(compactness(maps)[headline].mean().item())
    assert both["complexity/ixg/input"] == pytest.approx(complexity(maps)[headline].mean().item())


def test_deletion_and_insertion_score_the_gridpg_maps_on_their_grid_images(trained_probe):
    from evaluation.deletion import deletion, insertion

    model, val = trained_probe
    softmax = lambda z: z.softmax(dim=1)  # noqa: E731
    maps, grid_images, rows = [], [], {}

    def keep(key, m, cells, scores, images, grid_ids):
        maps.append(m)
        grid_images.append(images)

    scores = evaluate_gridpg(
        model, val.images, val.labels, softmax, methods=["ixg"], layers=["input"], n_grids=4, confidence=0.6,
        metrics=("gridpg", "deletion", "insertion"), on_maps=keep, on_rows=lambda key, columns: rows.setdefault(key, columns),
    )  # fmt: skip
    maps = torch.cat(maps)
    inputs = model.preprocess(torch.cat(grid_images)).repeat_interleave(4, dim=0)  # a row per cell of each grid
    targets = rows[("gridpg", "ixg", "input")]["class"]
    for name, score in (("deletion", deletion), ("insertion", insertion)):
        columns = rows[(name, "ixg", "input")]
        expected = score(model, inputs, targets, maps, softmax)
        torch.testing.assert_close(columns["score"], expected, atol=1e-5, rtol=1e-4)
        assert scores[f"{name}/ixg/input"] == pytest.approx(expected[columns["headline"]].mean().item(), abs=1e-5)
        assert torch.equal(columns["grid"], rows[("gridpg", "ixg", "input")]["grid"])
