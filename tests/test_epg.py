"""EPG on multi-label data with boxes: masks from boxes, rows per (image, class), a known answer."""

import pytest
import torch
from torch import nn

from evaluation.epg import box_mask, epg_rows, evaluate_epg


def test_box_mask_is_the_union_of_the_class_boxes_without_flagged_ones():
    boxes = torch.tensor(
        [[3, 0.0, 0.0, 2.0, 2.0, 0], [3, 4.0, 1.0, 6.0, 3.0, 0], [3, 0.0, 4.0, 8.0, 8.0, 1], [5, 0.0, 0.0, 8.0, 8.0, 0]]
    )
    mask = box_mask(boxes, 3, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:2, 0:2] = True  # pixel centres 0.5 and 1.5 lie in [0, 2]
    expected[1:3, 4:6] = True
    assert torch.equal(mask, expected)  # the flagged (difficult) box of class 3 and the class-5 box are out


def test_rows_cover_each_unflagged_class_of_the_chosen_images():
    boxes = (
        torch.tensor([[1, 0, 0, 4, 4, 0], [2, 0, 0, 4, 4, 1]]),  # class 2 only difficult: not a row
        torch.zeros(0, 6),  # no boxes: skipped
        torch.tensor([[0, 0, 0, 4, 4, 0], [4, 1, 1, 3, 3, 0], [0, 2, 2, 4, 4, 0]]),
    )
    assert sorted(epg_rows(boxes, n_images=10)) == [(0, 1), (2, 0), (2, 4)]
    assert len({i for i, _ in epg_rows(boxes, n_images=1)}) == 1


class QuadrantModel(nn.Module):
    """Logit k is the mean of the input in quadrant k (row-major): Input x Gradient puts each
    class's attribution in its own quadrant, so EPG against that quadrant's box is exactly 1."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def preprocess(self, images):
        return images

    def forward_to(self, x, layer):
        return x

    def forward_from(self, a, layer):
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        quads = [a[..., :h, :w], a[..., :h, w:], a[..., h:, :w], a[..., h:, w:]]
        return torch.stack([q.mean(dim=(1, 2, 3)) for q in quads], dim=1) * self.scale

    def forward(self, x):
        return self.forward_from(x, "input")


def test_epg_scores_one_for_attribution_inside_the_boxes():
    images = torch.rand(3, 3, 8, 8) + 0.1  # positive, so Input x Gradient is positive in the quadrant
    boxes = (
        torch.tensor([[0, 0.0, 0.0, 4.0, 4.0, 0], [3, 4.0, 4.0, 8.0, 8.0, 0]]),
        torch.tensor([[1, 4.0, 0.0, 8.0, 4.0, 0]]),
        torch.tensor([[2, 0.0, 4.0, 4.0, 8.0, 0], [2, 0.0, 0.0, 8.0, 8.0, 1]]),
    )
    metrics = evaluate_epg(QuadrantModel(), images, boxes, torch.sigmoid, ["ixg"], ["input"], rows_per_batch=2)
    assert metrics["epg/rows"] == 4 and metrics["epg/ixg/input"] == pytest.approx(1.0)
    half = (torch.tensor([[0, 0.0, 0.0, 4.0, 2.0, 0]]),)  # the top half of quadrant 0 only
    metrics = evaluate_epg(QuadrantModel(), images[:1], half, torch.sigmoid, ["ixg"], ["input"])
    expected = images[0, :, :2, :4].sum() / images[0, :, :4, :4].sum()
    assert metrics["epg/ixg/input"] == pytest.approx(expected.item(), rel=1e-5)


def test_every_epg_row_is_kept_with_its_image_class_and_the_probes_confidence():
    images = torch.rand(3, 3, 8, 8) + 0.1
    boxes = (
        torch.tensor([[0, 0.0, 0.0, 4.0, 4.0, 0], [3, 4.0, 4.0, 8.0, 8.0, 0]]),
        torch.tensor([[1, 4.0, 0.0, 8.0, 4.0, 0]]),
        torch.tensor([[2, 0.0, 4.0, 4.0, 8.0, 0]]),
    )
    kept = {}
    model = QuadrantModel()
    metrics = evaluate_epg(
        model, images, boxes, torch.sigmoid, ["ixg"], ["input"], rows_per_batch=3, seed=1,
        on_rows=lambda key, columns: kept.setdefault(key, columns),
    )  # fmt: skip
    columns = kept[("epg", "ixg", "input")]
    rows = epg_rows(boxes, 64, seed=1)
    assert list(zip(columns["image"].tolist(), columns["class"].tolist())) == rows
    with torch.no_grad():
        expected = torch.sigmoid(model(images))[columns["image"], columns["class"]]
    torch.testing.assert_close(columns["confidence"], expected)
    assert columns["score"].mean().item() == pytest.approx(metrics["epg/ixg/input"])
    other = {}  # another probe (another probability function) scores the same rows
    evaluate_epg(model, images, boxes, lambda z: z.softmax(dim=1), ["ixg"], ["input"], seed=1, on_rows=lambda key, c: other.setdefault(key, c))
    assert torch.equal(other[("epg", "ixg", "input")]["image"], columns["image"]) and torch.equal(other[("epg", "ixg", "input")]["class"], columns["class"])


def test_the_pointing_game_scores_the_same_rows_and_maps_as_epg():
    from evaluation.localization import pointing_game

    images = torch.rand(2, 3, 40, 40) + 0.1
    boxes = (
        torch.tensor([[0, 0.0, 0.0, 4.0, 4.0, 0], [3, 30.0, 30.0, 40.0, 40.0, 0]]),  # a small box of class 0
        torch.tensor([[1, 20.0, 0.0, 40.0, 20.0, 0]]),  # quadrant 1 whole: a hit
    )
    kept, shown = {}, []
    metrics = evaluate_epg(
        QuadrantModel(), images, boxes, torch.sigmoid, ["ixg"], ["input"], metrics=("pointing_game", "epg"),
        on_rows=lambda key, columns: kept.setdefault(key, columns), on_maps=lambda key, maps, *rest: shown.append((key, maps)),
    )  # fmt: skip
    assert {key for key, _ in shown} == {("pointing_game", "ixg", "input")}  # one figure per map, not per metric
    maps = torch.cat([m for _, m in shown])
    columns = kept[("pointing_game", "ixg", "input")]
    masks = torch.stack([box_mask(boxes[i], c, 40, 40) for i, c in zip(columns["image"].tolist(), columns["class"].tolist())])
    torch.testing.assert_close(columns["score"], pointing_game(maps, masks))
    assert torch.equal(columns["image"], kept[("epg", "ixg", "input")]["image"])
    assert metrics["pointing_game/ixg/input"] == pytest.approx(columns["score"].mean().item())
    hits = dict(zip(zip(columns["image"].tolist(), columns["class"].tolist()), columns["score"].tolist()))
    assert hits[(1, 1)] == 1.0  # the peak lies in quadrant 1, the box
    with pytest.raises(ValueError, match="not scored on boxes"):
        evaluate_epg(QuadrantModel(), images, boxes, torch.sigmoid, ["ixg"], ["input"], metrics=("gridpg",))
