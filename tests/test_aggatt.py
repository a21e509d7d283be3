"""AggAtt bins on hand-computed cases (REFERENCE section 5)."""

import numpy as np
import pytest
import torch

from evaluation.aggatt import aggatt_bins, aggatt_figure
from evaluation.panels import EMPTY_GREY, Panel, compose, heat_rgb, overlay_rgb, panel_boxes


def test_bins_follow_the_percentiles_best_first():
    n = 100
    maps = torch.arange(n, dtype=torch.float64).view(n, 1, 1).expand(n, 2, 2).clone()  # map i is constant i
    scores = torch.arange(n, dtype=torch.float64)  # map i scores i: the best is map 99
    agg = aggatt_bins(maps, scores)
    assert agg.counts == [2, 3, 45, 45, 3, 2]
    assert agg.labels == ["0-2%", "2-5%", "5-50%", "50-95%", "95-98%", "98-100%"]
    expected = [(99 + 98) / 2, (97 + 96 + 95) / 3, sum(range(50, 95)) / 45, sum(range(5, 50)) / 45, 3.0, 0.5]
    torch.testing.assert_close(agg.maps[:, 0, 0], torch.tensor(expected, dtype=torch.float64))


def test_negative_values_do_not_enter_the_means_and_vmax_clips():
    maps = torch.zeros(4, 20, 20)
    maps[:, 0, 0] = 1000.0  # one extreme pixel in 400
    maps[:, 5, 5] = -3.0
    maps[:, 1:3, 1:3] = 1.0
    agg = aggatt_bins(maps, torch.tensor([0.1, 0.2, 0.3, 0.4]), percentiles=(0, 50, 100))
    assert agg.counts == [2, 2] and agg.maps[:, 5, 5].tolist() == [0.0, 0.0]
    values = agg.maps.flatten().double()
    assert agg.vmax == pytest.approx(float(torch.quantile(values, 0.995)))
    assert 1.0 <= agg.vmax < 1000.0  # the extreme pixel does not set the scale


def test_empty_bins_are_zero_and_counted():
    agg = aggatt_bins(torch.ones(3, 4, 4), torch.tensor([0.3, 0.2, 0.1]))
    assert sum(agg.counts) == 3 and agg.counts[0] == 0 and agg.maps[0].abs().sum() == 0


def _shown(figure):
    """The figure's panels image (one Axes) and the texts drawn on it."""
    (ax,) = [ax for ax in figure.axes if ax.images]
    return ax, ax.images[0].get_array(), [t.get_text() for t in ax.texts]


def _panel(image, row, column, rows, columns, side, captions=False):
    """Panel (row, column) of a composed image of ``side`` x ``side`` panels."""
    shape, corners = panel_boxes(rows, columns, side, side, captions)
    assert image.shape[:2] == shape
    y, x = corners[row][column]
    return image[y : y + side, x : x + side]


def test_figure_uses_one_colour_scale_for_all_bins():
    agg = aggatt_bins(torch.rand(50, 8, 8), torch.rand(50))
    figure = aggatt_figure(agg, title="gridpg/ixg/input")
    _, image, texts = _shown(figure)
    for b in range(6):  # every bin drawn on [0, vmax]
        assert np.allclose(_panel(image, 0, b, 1, 6, 8), heat_rgb(agg.maps[b].numpy(), agg.vmax))
    assert texts == [f"{label}\n({count} maps)" for label, count in zip(agg.labels, agg.counts)]
    (colour_bar,) = [ax for ax in figure.axes if ax.get_ylabel() == "mean positive attribution"]  # the scale, drawn once
    assert colour_bar.get_ylim() == pytest.approx((0.0, agg.vmax))
    assert figure._suptitle.get_text() == "gridpg/ixg/input"


def test_an_empty_bin_is_an_empty_labelled_panel_and_grid_cells_are_outlined():
    agg = aggatt_bins(torch.rand(3, 16, 16), torch.tensor([0.3, 0.2, 0.1]))
    figure = aggatt_figure(agg, title="sup bce linear: gridpg/ixg/input", grid=2)
    ax, image, texts = _shown(figure)
    assert agg.counts == [0, 0, 2, 1, 0, 0]
    assert texts[:4] == ["no maps"] * 4 and texts[-6:-4] == ["0-2%\n(0 maps)", "2-5%\n(0 maps)"]
    assert np.allclose(_panel(image, 0, 0, 1, 6, 16), EMPTY_GREY)  # not a black square
    # one horizontal and one vertical line between the 2 x 2 cells of each of the 2 filled 16 px panels
    (cells,) = ax.collections
    segments = sorted(tuple(map(tuple, s)) for s in cells.get_segments())
    corners = panel_boxes(1, 6, 16, 16, False)[1][0]
    expected = []
    for b in range(6):
        if agg.counts[b]:
            y, x = corners[b]
            expected += [((x - 0.5, y + 7.5), (x + 15.5, y + 7.5)), ((x + 7.5, y - 0.5), (x + 7.5, y + 15.5))]
    assert len(expected) == 4 and segments == sorted(expected)


def test_panels_are_composed_on_a_white_ground_in_reading_order():
    red, blue = np.zeros((4, 4, 3)), np.zeros((2, 2, 3))
    red[..., 0], blue[..., 2] = 1.0, 1.0
    image, corners, size = compose([[Panel(red), Panel(note="why")], [Panel(), Panel(blue, caption="score 1.00")]])
    assert size == (4, 4) and corners == [[(0, 0), (0, 5)], [(6, 0), (6, 5)]]  # gaps of 1 px, a caption row of 1 px
    assert image.shape == (10, 9, 3)
    assert np.array_equal(image[0:4, 0:4], red) and np.all(image[0:4, 5:9] == EMPTY_GREY)
    assert np.all(image[6:10, 0:4] == 1.0) and np.all(image[4:6] == 1.0)  # blank panel and gaps stay white
    assert np.array_equal(image[6:10, 5:9], np.repeat(np.repeat(blue, 2, 0), 2, 1))  # nearest: each pixel kept
    assert np.allclose(overlay_rgb(red, np.zeros((4, 4)), alpha=0.5), 0.5 * red + 0.5 * heat_rgb(np.zeros((4, 4)), 1.0))
    assert np.allclose(heat_rgb(np.array([[2.0, -1.0]]), 1.0), heat_rgb(np.array([[1.0, 0.0]]), 1.0))  # clipped to the scale


def test_stored_bins_are_pooled_to_the_figures_size_and_read_back(tmp_path):
    from evaluation.aggatt import load_aggatt, save_aggatt

    agg = aggatt_bins(torch.rand(40, 256, 256), torch.rand(40))
    save_aggatt(agg, tmp_path / "bins.npz")
    back = load_aggatt(tmp_path / "bins.npz")
    assert back.maps.shape == (6, 128, 128) and back.counts == agg.counts and back.labels == agg.labels and back.vmax == agg.vmax
    pooled = torch.nn.functional.avg_pool2d(agg.maps[:, None], 2)[:, 0]
    assert torch.allclose(back.maps, pooled, atol=2e-3)  # float16


def test_the_side_by_side_figure_has_a_column_per_probe_in_order_each_on_its_scale():
    from evaluation.aggatt import comparison_figure

    probes = [(name, aggatt_bins(torch.rand(30, 8, 8) * scale, torch.rand(30))) for name, scale in (("ce", 1.0), ("bce", 50.0), ("bcos", 0.01))]
    figure = comparison_figure(probes, "gridpg/ixg/input", grid=2)
    _, image, texts = _shown(figure)
    assert texts[-9:] == ["ce", "bce", "bcos", "0-2%", "2-5%", "5-50%", "50-95%", "95-98%", "98-100%"]
    # each probe's maps over its own 99.5th percentile: a 5000x larger attribution looks the same
    for column, (_, agg) in enumerate(probes):
        for row in range(6):
            assert np.allclose(_panel(image, row, column, 6, 3, 8), heat_rgb(agg.maps[row].numpy() / agg.vmax, 1.0))
    (colour_bar,) = [ax for ax in figure.axes if ax.get_ylabel() == "attribution / the probe's 99.5th pct."]
    assert colour_bar.get_ylim() == pytest.approx((0.0, 1.0))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="need maps \\(N, H, W\\) and scores \\(N,\\), got \\(3, 4, 4\\) and \\(2,\\)"):
        aggatt_bins(torch.ones(3, 4, 4), torch.ones(2))


def test_heatmap_gallery_overlays_each_map_on_its_image():
    from evaluation.aggatt import heatmap_gallery

    images = torch.rand(5, 3, 16, 16)
    maps = torch.zeros(5, 16, 16)
    maps[:, 2:6, 3:9] = 1.0
    figure = heatmap_gallery(images, maps, torch.linspace(0, 1, 5), title="gridpg/ixg/input", columns=3)
    _, image, texts = _shown(figure)
    assert texts == ["score 0.00", "score 0.25", "score 0.50", "score 0.75", "score 1.00"]
    for k in range(5):  # 2 rows of 3, the last panel blank
        picture = images[k].permute(1, 2, 0).numpy()
        shown = _panel(image, k // 3, k % 3, 2, 3, 16, captions=True)
        assert np.allclose(shown, overlay_rgb(picture, maps[k].numpy()))
        # the positive region is bright over the image, the rest dark
        assert np.allclose(shown[3, 4], 0.4 * picture[3, 4] + 0.6 * heat_rgb(np.ones((1, 1)), 1.0)[0, 0])
    assert np.all(_panel(image, 1, 2, 2, 3, 16, captions=True) == 1.0)
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_stored_examples_come_back_and_probes_are_shown_on_the_examples_they_share(tmp_path):
    from evaluation.aggatt import examples_comparison_figure, load_examples, save_examples

    images, maps = torch.rand(5, 3, 32, 32), torch.rand(5, 32, 32)
    save_examples(images, maps, torch.linspace(0, 1, 5), torch.tensor([3, 8, 9, 12, 20]), tmp_path / "a.npz")
    first = load_examples(tmp_path / "a.npz")
    assert first["images"].shape == (5, 3, 32, 32) and torch.allclose(first["images"], images, atol=1 / 255)
    assert first["ids"].tolist() == [3, 8, 9, 12, 20] and torch.allclose(first["maps"], maps, atol=1e-3)
    save_examples(images[:4], maps[:4], torch.zeros(4), torch.tensor([1, 8, 12, 3]), tmp_path / "b.npz")
    second = load_examples(tmp_path / "b.npz")
    figure = examples_comparison_figure([("ce", first), ("bce", second)], "gridpg/ixg/input", rows=2)
    _, image, texts = _shown(figure)
    # a row per shared example (3, 8: the first two by id), a column per probe, in order, each with its score
    assert texts == ["score 0.00", "score 0.00", "score 0.25", "score 0.00", "ce", "bce", "#3", "#8"]
    assert np.allclose(_panel(image, 1, 0, 2, 2, 32, captions=True), overlay_rgb(first["images"][1].permute(1, 2, 0).numpy(), _scaled(first["maps"][1])))
    # three probes: the examples most of them hold come first; one a probe lacks is an empty, labelled panel
    third = {**second, "ids": torch.tensor([8, 30, 31, 32])}
    figure = examples_comparison_figure([("ce", first), ("bce", second), ("bcos", third)], rows=2)
    _, image, texts = _shown(figure)
    assert texts[-2:] == ["#8", "#3"]  # 8: all three; 3: two of them
    assert "not among\nits examples" in texts and np.all(_panel(image, 1, 2, 2, 3, 32, captions=True) == EMPTY_GREY)
    assert examples_comparison_figure([("ce", first), ("x", {**second, "ids": torch.tensor([0, 2, 4, 6])})]) is None  # nothing shared


def _scaled(heat):
    """A map's positive part over its 99.5th percentile, clipped at 1: how an example panel scales it."""
    positive = heat.clamp(min=0).double()
    return (positive / torch.quantile(positive.flatten(), 0.995)).clamp(max=1).numpy()
