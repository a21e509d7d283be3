"""Attribution methods: one registry, one call shape.

``create_method(name)(model, images, targets, layer=...) -> maps (B, H, W)``, batched: row i
explains ``targets[i]`` for ``images[i]``. Each method registers itself beside its code with
``@attribution_method``; importing this package imports them all.
"""

from __future__ import annotations

from evaluation.attribution.ablation_cam import ablation_cam
from evaluation.attribution.attention import attention_gradient, attention_rollout
from evaluation.attribution.attention_lrp import attention_lrp, lrp_weighted_attention
from evaluation.attribution.bcos import bcos_explanation
from evaluation.attribution.cam_variants import grad_cam_plus_plus, layer_cam
from evaluation.attribution.common import ALL_LAYERS, METHODS, AttributionMethod
from evaluation.attribution.grad_cam import grad_cam
from evaluation.attribution.gradient import gradient
from evaluation.attribution.guided_backprop import guided_backprop
from evaluation.attribution.intgrad import integrated_gradients
from evaluation.attribution.ixg import input_x_gradient
from evaluation.attribution.lime import lime
from evaluation.attribution.lrp import NO_LRP_RULES, lrp
from evaluation.attribution.occlusion import occlusion
from evaluation.attribution.rise import rise, rise_masks
from evaluation.attribution.score_cam import score_cam
from evaluation.attribution.vit_cx import vit_cx, vit_cx_masks

__all__ = [
    "ALL_LAYERS",
    "METHODS",
    "NO_LRP_RULES",
    "AttributionMethod",
    "ablation_cam",
    "attention_gradient",
    "attention_lrp",
    "attention_rollout",
    "rise",
    "rise_masks",
    "bcos_explanation",
    "occlusion",
    "lrp",
    "lime",
    "score_cam",
    "create_method",
    "list_methods",
    "grad_cam",
    "grad_cam_plus_plus",
    "gradient",
    "layer_cam",
    "lrp_weighted_attention",
    "guided_backprop",
    "input_x_gradient",
    "integrated_gradients",
    "vit_cx",
    "vit_cx_masks",
]


def create_method(name: str) -> AttributionMethod:
    """The registered method ``name`` (unknown: the closest name in the error)."""
    return METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style ``pattern``."""
    return METHODS.names(pattern)
