"""GridPG on hand-computed maps (REFERENCE section 5; Rao et al., CVPR 2022)."""

import math

import numpy as np
import pytest
import torch

from evaluation.localization import energy_pointing_game, grid_pointing_game


def _map(values_per_cell, cell_size=4):
    """A 2x2-grid map whose cell k is filled with ``values_per_cell[k]`` (row-major)."""
    a, b, c, d = values_per_cell
    top = torch.cat([torch.full((cell_size, cell_size), a), torch.full((cell_size, cell_size), b)], dim=1)
    bottom = torch.cat([torch.full((cell_size, cell_size), c), torch.full((cell_size, cell_size), d)], dim=1)
    return torch.cat([top, bottom], dim=0)


def test_uniform_map_scores_a_quarter_in_every_cell():
    maps = torch.ones(4, 8, 8)
    scores = grid_pointing_game(maps, 2, torch.arange(4))
    torch.testing.assert_close(scores, torch.full((4,), 0.25))


def test_all_mass_in_target_cell_scores_one_and_elsewhere_zero():
    maps = torch.stack([_map([0, 0, 0, 3.0]), _map([0, 0, 0, 3.0])])
    scores = grid_pointing_game(maps, 2, torch.tensor([3, 0]))
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))


def test_all_zero_map_scores_zero_not_nan():
    scores = grid_pointing_game(torch.zeros(2, 8, 8), 2, torch.tensor([0, 1]))
    assert torch.equal(scores, torch.zeros(2))


def test_negative_values_are_ignored():
    # positive mass: cell 0 holds 1 per pixel, cell 1 holds 3 per pixel; cells 2, 3 negative.
    maps = _map([1.0, 3.0, -5.0, -100.0])[None]
    score = grid_pointing_game(maps, 2, torch.tensor([0]))
    torch.testing.assert_close(score, torch.tensor([16.0 / (16.0 + 48.0)]))


def test_hand_computed_3x3_grid_with_mixed_values():
    maps = torch.zeros(1, 6, 6)
    maps[0, 2:4, 2:4] = 2.0  # centre cell (index 4): 4 pixels x 2 = 8
    maps[0, 0, 0] = 1.0  # top-left cell: 1
    maps[0, 5, 5] = -7.0  # ignored
    score = grid_pointing_game(maps, 3, torch.tensor([4]))
    torch.testing.assert_close(score, torch.tensor([8.0 / 9.0]))


@pytest.mark.parametrize(
    "maps, grid, cells, message",
    [
        (torch.ones(8, 8), 2, torch.tensor([0]), "must be \\(B, H, W\\)"),
        (torch.ones(1, 7, 8), 2, torch.tensor([0]), "not divisible by grid 2"),
        (torch.ones(1, 8, 8), 2, torch.tensor([4]), "indices in \\[0, 4\\)"),
    ],
)
def test_bad_input_is_named(maps, grid, cells, message):
    with pytest.raises(ValueError, match=message):
        grid_pointing_game(maps, grid, cells)


def test_energy_pointing_game_by_hand():
    maps = torch.tensor([[[1.0, 2.0], [3.0, -4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    scores = energy_pointing_game(maps, masks)
    torch.testing.assert_close(scores, torch.tensor([(1.0 + 3.0) / 6.0, 0.0]))


def test_energy_pointing_game_equals_quantus_attribution_localisation():
    import numpy as np
    import quantus

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 16, 16, generator=generator, dtype=torch.float64)
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    for b in range(6):  # a different box per image, as a class's boxes would be
        masks[b, b : b + 6, 2 * b : 2 * b + 5] = True
    metric = quantus.AttributionLocalisation(
        positive_attributions=True, abs=False, normalise=False, disable_warnings=True
    )
    expected = metric(
        model=None,
        x_batch=np.zeros((6, 1, 16, 16)),
        y_batch=np.zeros(6, dtype=int),
        a_batch=maps[:, None].numpy(),
        s_batch=masks[:, None].numpy().astype(float),
    )
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_energy_pointing_game_needs_matching_masks():
    with pytest.raises(ValueError, match="maps and masks must both be \\(B, H, W\\), got \\(1, 4, 4\\) and \\(1, 4, 3\\)"):
        energy_pointing_game(torch.ones(1, 4, 4), torch.ones(1, 4, 3, dtype=torch.bool))


@pytest.mark.parametrize("metric", ["gridpg", "epg"])
def test_a_nan_map_or_a_tiny_positive_mass_scores_zero_and_leaves_the_others_alone(metric):
    maps = torch.stack([_map([1.0, 0, 0, 0]), _map([1.0, 0, 0, 0]), _map([1.0, 0, 0, 0])])
    maps[1, 5, 5] = float("nan")  # one broken pixel, outside the target cell
    maps[2] *= 1e-7 / 16  # total positive mass 1e-7: rounding noise, not evidence
    if metric == "gridpg":
        scores = grid_pointing_game(maps, 2, torch.zeros(3, dtype=torch.long))
    else:
        masks = torch.zeros(3, 8, 8, dtype=torch.bool)
        masks[:, :4, :4] = True  # the first cell
        scores = energy_pointing_game(maps, masks)
    assert torch.equal(scores, torch.tensor([1.0, 0.0, 0.0]))
    assert scores.mean() == pytest.approx(1 / 3)  # a mean over them stays a number


def _quantus(metric_class, maps):
    import quantus

    metric = metric_class(abs=True, normalise=False, disable_warnings=True)
    n = len(maps)
    return np.array(metric(model=None, x_batch=np.zeros((n, 1, *maps.shape[1:])), y_batch=np.zeros(n, dtype=int),
                           a_batch=maps.numpy()[:, None].copy(), channel_first=True))  # fmt: skip


def test_compactness_and_complexity_equal_quantus_sparseness_and_complexity():
    import quantus

    from evaluation.map_metrics import compactness, complexity

    maps = torch.randn(6, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    maps[1] = maps[1].clamp(min=0) ** 3  # a peakier map
    np.testing.assert_allclose(compactness(maps).numpy(), _quantus(quantus.Sparseness, maps), rtol=1e-6)
    np.testing.assert_allclose(complexity(maps).numpy(), _quantus(quantus.Complexity, maps), rtol=1e-6)


def test_compactness_and_complexity_of_a_uniform_and_a_one_pixel_map():
    from evaluation.map_metrics import compactness, complexity

    uniform, one = torch.ones(1, 8, 8, dtype=torch.float64), torch.zeros(1, 8, 8, dtype=torch.float64)
    one[0, 3, 5] = 2.0
    assert compactness(uniform).item() == pytest.approx(0.0, abs=1e-12)
    # the Gini index's largest value for 64 pixels, less what the 1e-7 on every pixel takes (3e-6 here)
    assert compactness(one).item() == pytest.approx(1 - 1 / 64, abs=1e-5)
    assert complexity(uniform).item() == pytest.approx(math.log(64)) and complexity(one).item() == pytest.approx(0.0, abs=1e-9)
    assert complexity(torch.zeros(1, 8, 8)).item() == 0.0  # no NaN for an all-zero map
