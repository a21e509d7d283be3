"""Pointing game (TorchRay's definition), deletion and insertion (RISE's), against per-image
references, hand cases and Quantus' PixelFlipping."""

import numpy as np
import pytest
import torch

from evaluation.deletion import area_under_curve, deletion, insertion, probability_curve, relevance_ranks
from evaluation.localization import pointing_game


def _torchray_hit(saliency: torch.Tensor, mask: torch.Tensor, tolerance: int) -> bool:
    """TorchRay's PointingGame.evaluate on the point TorchRay takes (the first maximum)."""
    width = saliency.shape[1]
    peak = int(torch.argmax(saliency.view(-1)))
    point = (peak % width, peak // width)  # (x, y)
    v, u = torch.meshgrid(
        (torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2,
        (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2,
        indexing="ij",
    )
    accept = (v + u) < tolerance**2
    return bool((mask & accept).view(-1).any())


def test_pointing_game_equals_torchray_on_random_maps_and_boxes():
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(64, 40, 48, generator=generator)
    masks = torch.zeros(64, 40, 48, dtype=torch.bool)
    for b in range(64):
        y0, x0 = torch.randint(0, 36, (1,), generator=generator).item(), torch.randint(0, 44, (1,), generator=generator).item()
        masks[b, y0 : y0 + 4, x0 : x0 + 4] = True
    for tolerance in (1, 5, 15):
        expected = [float(_torchray_hit(maps[b], masks[b], tolerance)) for b in range(64)]
        hits = pointing_game(maps, masks, tolerance)
        assert hits.tolist() == expected
    assert 0 < pointing_game(maps, masks, 15).mean() < 1  # the cases hold hits and misses


def test_pointing_game_hand_cases_at_the_tolerance_edge():
    maps = torch.zeros(3, 40, 40)
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[:, 20:, :] = True  # rows 20 and below
    maps[0, 25, 3] = 1.0  # inside
    maps[1, 6, 3] = 1.0  # 14 px above row 20: within 15
    maps[2, 5, 3] = 1.0  # 15 px: TorchRay's disc is open (< 15**2), a miss
    assert pointing_game(maps, masks).tolist() == [1.0, 1.0, 0.0]
    assert pointing_game(maps, masks, tolerance=0).tolist() == [1.0, 0.0, 0.0]


def test_pointing_game_misses_on_a_blank_or_broken_map():
    masks = torch.ones(2, 8, 8, dtype=torch.bool)
    maps = torch.zeros(2, 8, 8)
    maps[1, 2, 2], maps[1, 0, 0] = 1.0, float("nan")
    assert pointing_game(maps, masks).tolist() == [0.0, 0.0]


class _Pixels(torch.nn.Module):
    """Logit 0 is the mean of channel 0's pixels in the left half, logit 1 that of the right half."""

    bcos_input = False

    def forward(self, x):
        half = x.shape[-1] // 2
        return torch.stack([x[:, 0, :, :half].mean(dim=(1, 2)), x[:, 0, :, half:].mean(dim=(1, 2))], dim=1) * 4


def _softmax(logits):
    return logits.softmax(dim=1)


def test_deletion_hand_case_with_a_known_curve():
    # logit 0 reads the left half only; a map that ranks the left half's pixels first deletes the
    # evidence in the first half of the steps, one ranking it last only at the end.
    inputs = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    good = torch.zeros(4, 4, dtype=torch.float64)
    good[:, :2] = torch.arange(8, 0, -1, dtype=torch.float64).view(4, 2)
    maps = torch.stack([good, good.flip(-1)])  # left half first; right half first
    targets = torch.zeros(2, dtype=torch.long)
    curve = probability_curve(_Pixels(), inputs, targets, maps, _softmax, 0.0, steps=4)
    # 4 pixels a step; the halves' means as the steps go, then the probability of class 0
    fast, slow = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0])
    left, right = torch.stack([fast, slow]), torch.stack([slow, fast])
    expected = (4 * torch.stack([left, right], dim=-1)).double().softmax(dim=-1)[..., 0]
    torch.testing.assert_close(curve, expected)
    score = deletion(_Pixels(), inputs, targets, maps, _softmax, steps=4)
    torch.testing.assert_close(score, area_under_curve(expected))
    assert score[0] < score[1]  # the map that finds the evidence deletes it sooner


def test_area_under_curve_is_the_trapezoid_over_zero_to_one():
    curve = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]])
    torch.testing.assert_close(area_under_curve(curve), torch.tensor([0.5, 0.2]))
    np.testing.assert_allclose(area_under_curve(curve).numpy(), np.trapezoid(curve.numpy(), dx=0.5, axis=1))


def _small_cnn(channels=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    ).double().eval()


def test_deletion_and_insertion_equal_a_per_image_reference_loop():
    model = _small_cnn()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, 10, 12, dtype=torch.float64, generator=generator)
    maps = torch.randn(5, 10, 12, dtype=torch.float64, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 4])
    steps = 6
    from evaluation.deletion import BLUR
    from evaluation.smoothing import smooth

    for kind, fn in (("deletion", deletion), ("insertion", insertion)):
        reference = []
        for b in range(5):
            order = [int(i) for i in torch.argsort(-maps[b].flatten(), stable=True)]
            image = inputs[b]
            blurred = smooth(image, BLUR)
            values = []
            for k in range(steps + 1):
                changed = torch.zeros(120, dtype=torch.bool)
                changed[order[: k * 120 // steps]] = True
                changed = changed.view(10, 12)
                if kind == "deletion":
                    x = torch.where(changed, torch.zeros_like(image), image)
                else:
                    x = torch.where(changed, image, blurred)
                with torch.no_grad():
                    values.append(model(x[None]).softmax(dim=1)[0, targets[b]].item())
            reference.append(np.trapezoid(values, dx=1 / steps))
        ours = fn(model, inputs, targets, maps, _softmax, steps=steps)
        np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-10, err_msg=kind)


def test_deletion_curve_equals_quantus_pixel_flipping():
    import quantus

    model = _small_cnn(channels=1).float()  # Quantus counts features over channels, and steps within H x W
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(4, 1, 8, 8, generator=generator)
    maps = torch.randn(4, 8, 8, generator=generator)  # distinct values: one order
    targets = torch.tensor([1, 0, 3, 2])
    steps = 8  # 8 pixels per step
    metric = quantus.PixelFlipping(features_in_step=64 // steps, perturb_baseline=0.0, normalise=False, disable_warnings=True)
    theirs = np.array(
        metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(), a_batch=maps[:, None].numpy(), device="cpu", softmax=True)
    )
    ours = probability_curve(model, inputs, targets, maps, _softmax, 0.0, steps)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, rtol=1e-5, atol=1e-6)  # Quantus leaves out the unperturbed point


def test_ranks_put_ties_in_row_major_order_and_nan_last():
    maps = torch.tensor([[[1.0, 2.0], [2.0, float("nan")]]])
    assert relevance_ranks(maps).tolist() == [[2, 0, 1, 3]]


def test_deletion_refuses_maps_that_do_not_fit_the_inputs():
    with pytest.raises(ValueError, match="upsample"):
        deletion(_Pixels(), torch.ones(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), torch.ones(1, 2, 2), _softmax)
