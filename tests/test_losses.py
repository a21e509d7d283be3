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
    with pytest.raises(ValueError, match="unknown loss 'bec': known are bce, bce_multilabel, bce_multilabel_uniform, ce; did you mean 'bce'"):
        create_loss("bec")


def _bce(z, t):
    """Binary cross-entropy written out: mean over batch and classes of -t log s(z) - (1-t) log(1-s(z))."""
    s = 1 / (1 + torch.exp(-z.double()))
    return float((-(t * torch.log(s) + (1 - t) * torch.log(1 - s))).mean())


MULTI_HOT = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0]])
MULTI_LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.3], [-0.2, 0.1, 1.5, -3.0], [0.0, 0.7, -0.4, 1.1]])


@pytest.mark.parametrize("head, off_target", [("linear", 0.0), ("mlp", 0.0), ("bcos", 0.25)])
def test_multi_label_probes_train_with_the_references_loss_per_head(head, off_target):
    from probing.losses import probe_loss

    loss = probe_loss("bce_multilabel", head)
    targets = MULTI_HOT.clamp(min=off_target)  # B-cos heads: non-targets 1/C (C = 4), as How to Probe's code
    assert loss.multilabel and loss.probabilities is torch.sigmoid
    assert loss(MULTI_LOGITS, MULTI_HOT).item() == pytest.approx(_bce(MULTI_LOGITS, targets), rel=1e-6)


@pytest.mark.parametrize("head", ["linear", "mlp", "bcos"])
def test_multi_label_probes_get_no_logit_bias(head):
    assert default_logit_bias("bce_multilabel", 20, head) == 0.0
    assert default_logit_bias("bce", 20, head) == pytest.approx(-math.log(19))  # single-label BCE keeps it
