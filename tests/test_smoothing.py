"""Smoothing of attribution maps against hand-built kernels (REFERENCE section 4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.smoothing import REFERENCE_SMOOTHING, Smoothing, gaussian_kernel, smooth


def _delta(size=15, at=(7, 7)):
    maps = torch.zeros(1, size, size, dtype=torch.float64)
    maps[0, at[0], at[1]] = 1.0
    return maps


def test_none_is_the_identity():
    maps = torch.randn(2, 8, 8)
    assert smooth(maps, Smoothing("none")) is maps


def test_average_pooling_spreads_a_delta_evenly():
    out = smooth(_delta(), Smoothing("avgpool", 5))
    expected = torch.zeros_like(out)
    expected[0, 5:10, 5:10] = 1 / 25
    torch.testing.assert_close(out, expected)


def test_gaussian_equals_the_dense_2d_kernel_away_from_the_borders():
    kernel, sigma = 7, 1.5
    out = smooth(_delta(), Smoothing("gaussian", kernel, sigma))
    dense = torch.tensor(
        [[math.exp(-((i - 3) ** 2 + (j - 3) ** 2) / (2 * sigma**2)) for j in range(kernel)] for i in range(kernel)],
        dtype=torch.float64,
    )
    expected = torch.zeros_like(out)
    expected[0, 4:11, 4:11] = dense / dense.sum()
    torch.testing.assert_close(out, expected)
    assert gaussian_kernel(kernel, sigma).sum().item() == pytest.approx(1.0)


def test_reference_gaussian_equals_torchvisions_gaussian_blur_with_its_reflection_padding():
    from torchvision.transforms.functional import gaussian_blur

    maps = torch.randn(2, 150, 140, generator=torch.Generator().manual_seed(0))
    ours = smooth(maps, REFERENCE_SMOOTHING["ixg"])
    expected = gaussian_blur(maps[:, None], [129, 129], [129 / 4, 129 / 4])[:, 0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    zero_padded = F.conv2d(maps[:, None], torch.outer(*(2 * [gaussian_kernel(129, 129 / 4)]))[None, None], padding=64)
    assert not torch.allclose(ours, zero_padded[:, 0], atol=1e-3)  # the borders differ from zero padding


def test_reference_gaussian_on_a_map_smaller_than_its_kernel_reflects_again():
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = smooth(maps, REFERENCE_SMOOTHING["ixg"])
    g = gaussian_kernel(129, 129 / 4)
    padded = maps[:, None]
    for _ in range(3):  # 31 + 31 + 2 = 64 px on each side, each step a plain reflection
        step = min(64 - (padded.shape[-1] - 32) // 2, padded.shape[-1] - 1)
        padded = F.pad(padded, (step,) * 4, mode="reflect")
    dense = F.conv2d(padded, torch.outer(g, g)[None, None])[:, 0]
    assert out.shape == maps.shape
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-6)


def test_smoothing_comes_before_clamping():
    maps = torch.zeros(1, 5, 5)
    maps[0, 2, 2], maps[0, 2, 3] = 3.0, -2.0
    out = smooth(maps, Smoothing("avgpool", 3))
    assert out[0, 2, 2].item() == pytest.approx(1 / 9)  # the negative neighbour lowered it before any clamp


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "median"}, "unknown smoothing 'median': known are none, avgpool, gaussian"),
        ({"kind": "avgpool", "kernel": 4}, "must be odd, got 4"),
        ({"kind": "gaussian", "kernel": 5, "sigma": 0}, "sigma\n  Input should be greater than 0"),
    ],
)
def test_bad_smoothing_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Smoothing(**kwargs)
