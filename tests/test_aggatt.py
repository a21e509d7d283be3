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
    images = [ax.get_images()[0] for ax in figure.axes]
    assert len(images) == 6 and {im.get_clim() for im in images} == {(0.0, agg.vmax)}


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
