"""Probe losses against the formulas of REFERENCE section 2, computed by hand."""

import math

import pytest
import torch

from probing.heads import create_head, default_logit_bias
from probing.losses import create_loss, uniform_off_label_targets


def test_uniform_off_label_targets():
    targets = uniform_off_label_targets(torch.tensor([2, 0]), 4)
    expected = torch.tensor([[0.25, 0.25, 1.0, 0.25], [1.0, 0.25, 0.25, 0.25]])
    assert torch.equal(targets, expected)


def test_bce_uniform_off_labels_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    labels = torch.tensor([0, 2])
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        for k, z in enumerate(row):
            t = 1.0 if k == label else 1.0 / 3.0
            p = 1.0 / (1.0 + math.exp(-z))
            total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    loss = create_loss("bce")(logits, labels)
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)


def test_ce_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    expected = -(2.0 - math.log(math.exp(2.0) + math.exp(-1.0) + math.exp(0.5)))
    assert create_loss("ce")(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_probabilities_follow_the_loss():
    logits = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(create_loss("ce").probabilities(logits), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(create_loss("bce").probabilities(logits), torch.sigmoid(logits))


def test_bce_logit_bias_makes_initial_outputs_one_over_c():
    assert default_logit_bias("bce", 10) == pytest.approx(-math.log(9))
    assert default_logit_bias("ce", 10) == 0.0
    head = create_head("linear", 8, 10, logit_bias=default_logit_bias("bce", 10))
    torch.nn.init.zeros_(head.body.weight)
    probabilities = torch.sigmoid(head(torch.randn(2, 8, 3, 3)))
    torch.testing.assert_close(probabilities, torch.full((2, 10), 0.1))


def test_unknown_loss_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown loss 'bec': known are bce, bce_multilabel, ce; did you mean 'bce'"):
        create_loss("bec")
