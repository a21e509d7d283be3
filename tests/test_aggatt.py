"""AggAtt bins on hand-computed cases (REFERENCE section 5)."""

import pytest
import torch

from evaluation.aggatt import aggatt_bins, aggatt_figure


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


def test_figure_uses_one_colour_scale_for_all_bins():
    agg = aggatt_bins(torch.rand(50, 8, 8), torch.rand(50))
    figure = aggatt_figure(agg, title="gridpg/ixg/input")
    images = [ax.get_images()[0] for ax in figure.axes if ax.get_images()]
    assert len(images) == 6 and {im.get_clim() for im in images} == {(0.0, agg.vmax)}
    (colour_bar,) = [ax for ax in figure.axes if ax.get_ylabel() == "mean positive attribution"]  # the scale, drawn once


def test_an_empty_bin_is_an_empty_labelled_panel_and_grid_cells_are_outlined():
    agg = aggatt_bins(torch.rand(3, 16, 16), torch.tensor([0.3, 0.2, 0.1]))
    figure = aggatt_figure(agg, title="sup bce linear: gridpg/ixg/input", grid=2)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels][:2] == ["0-2%\n(0 maps)", "2-5%\n(0 maps)"]
    assert not panels[0].get_images() and [t.get_text() for t in panels[0].texts] == ["no maps"]
    # one horizontal and one vertical line between the 2 x 2 cells of a 16 px grid image
    lines = panels[3].get_lines()
    assert sorted((tuple(line.get_xdata()), tuple(line.get_ydata())) for line in lines) == [((0, 1), (7.5, 7.5)), ((7.5, 7.5), (0, 1))]
    assert figure._suptitle.get_text() == "sup bce linear: gridpg/ixg/input"


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
    panels = [ax for ax in figure.axes if ax.get_ylabel() != "attribution / the probe's 99.5th pct."]
    assert [ax.get_title() for ax in panels[:3]] == ["ce", "bce", "bcos"]
    assert [ax.get_ylabel() for ax in panels[::3]] == ["0-2%", "2-5%", "5-50%", "50-95%", "95-98%", "98-100%"]
    # each probe's maps over its own 99.5th percentile: a 5000x larger attribution looks the same
    for column, (_, agg) in enumerate(probes):
        shown = panels[3 * 3 + column].get_images()[0].get_array()
        assert abs(float(shown.max()) - float(agg.maps[3].max() / agg.vmax)) < 1e-5


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="need maps \\(N, H, W\\) and scores \\(N,\\), got \\(3, 4, 4\\) and \\(2,\\)"):
        aggatt_bins(torch.ones(3, 4, 4), torch.ones(2))


def test_heatmap_gallery_overlays_each_map_on_its_image():
    from evaluation.aggatt import heatmap_gallery

    images = torch.rand(5, 3, 16, 16)
    maps = torch.zeros(5, 16, 16)
    maps[:, 2:6, 3:9] = 1.0
    figure = heatmap_gallery(images, maps, torch.linspace(0, 1, 5), title="gridpg/ixg/input", columns=3)
    shown = [ax for ax in figure.axes if ax.images]
    assert len(figure.axes) == 6 and len(shown) == 5  # 2 rows of 3, one empty panel
    picture, overlay = shown[0].images
    assert picture.get_array().shape == (16, 16, 3)
    heat = overlay.get_array()
    assert heat[3, 4] == 1.0 and heat[10, 10] == 0.0  # the positive region is bright, the rest dark
    assert [ax.get_title() for ax in shown][-1] == "score 1.00"
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
    panels = figure.axes
    # a row per shared example (3, 8: the first two by id), a column per probe, in order
    assert [ax.get_title() for ax in panels[:2]] == ["ce", "bce"] and [ax.get_ylabel() for ax in panels[::2]] == ["#3", "#8"]
    assert panels[1].get_xlabel() == "score 0.00" and panels[0].get_xlabel() == "score 0.00" and panels[2].get_xlabel() == "score 0.25"
    # three probes: the examples most of them hold come first; one a probe lacks is an empty, labelled panel
    third = {**second, "ids": torch.tensor([8, 30, 31, 32])}
    figure = examples_comparison_figure([("ce", first), ("bce", second), ("bcos", third)], rows=2)
    assert [ax.get_ylabel() for ax in figure.axes[::3]] == ["#8", "#3"]  # 8: all three; 3: two of them
    lacking = figure.axes[5]  # row "#3", probe "bcos"
    assert not lacking.get_images() and [t.get_text() for t in lacking.texts] == ["not among\nits examples"]
    assert examples_comparison_figure([("ce", first), ("x", {**second, "ids": torch.tensor([0, 2, 4, 6])})]) is None  # nothing shared
