"""Probe losses (REFERENCE section 2) and the output activation that goes with each.

The activation matters downstream: confidence thresholds for GridPG and probability-based
attribution methods use sigmoid for BCE probes and softmax for CE probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from probing.registry import Registry

__all__ = ["LOSSES", "Loss", "create_loss", "list_losses", "probe_loss", "uniform_off_label_targets"]


@dataclass(frozen=True)
class Loss:
    """A loss on logits (B, K) and labels, and the probabilities it trains the logits to give.

    Labels are class indices (B,) for single-label losses and multi-hot (B, K) floats for
    ``multilabel`` ones.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    multilabel: bool = False
    description: str = ""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, labels)


LOSSES: Registry[Loss] = Registry("loss")


def uniform_off_label_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot (for (B,) class indices) or multi-hot (for (B, C) labels) targets clamped from below
    at 1/C: 1 for the true classes, 1/C elsewhere."""
    hot = labels.float() if labels.dim() == 2 else F.one_hot(labels, num_classes).float()
    return hot.clamp(min=1.0 / num_classes)


def _bce_uniform_off_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = uniform_off_label_targets(labels, logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits, targets)  # mean over batch and classes


LOSSES.register("ce")(Loss("ce", F.cross_entropy, lambda z: z.softmax(dim=1), description="softmax cross-entropy (single-label)"))
LOSSES.register("bce")(
    Loss("bce", _bce_uniform_off_labels, torch.sigmoid, description="binary cross-entropy, off-label targets 1/C (single-label; How to Probe)")
)
# multi-label data (VOC, COCO): plain BCE on multi-hot targets; the uniform off-labels variant
# (non-targets 1/C) is what the How to Probe code trains B-cos heads with (see probe_loss)
LOSSES.register("bce_multilabel")(
    Loss("bce_multilabel", lambda z, t: F.binary_cross_entropy_with_logits(z, t.float()), torch.sigmoid, True,
         "binary cross-entropy on multi-hot labels (VOC, COCO)")
)
LOSSES.register("bce_multilabel_uniform")(
    Loss("bce_multilabel_uniform", _bce_uniform_off_labels, torch.sigmoid, True,
         "binary cross-entropy on multi-hot labels, off-label targets 1/C (B-cos heads)")
)

#: the loss a head type actually trains with, where the reference differs by head
HEAD_VARIANTS = {("bce_multilabel", "bcos"): "bce_multilabel_uniform"}


def create_loss(name: str) -> Loss:
    return LOSSES.get(name)


def probe_loss(name: str, head: str) -> Loss:
    """The loss ``name`` as the reference trains a ``head`` type with it: ``bce_multilabel`` is plain
    BCE for standard heads and uniform off-labels BCE for B-cos heads (How to Probe's VOC/COCO configs)."""
    return create_loss(HEAD_VARIANTS.get((name, head), name))


def list_losses(pattern: str = "*") -> list[str]:
    return LOSSES.names(pattern)
