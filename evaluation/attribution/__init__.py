"""Attribution methods: one registry, one call shape.

``create_method(name)(model, images, targets, layer=...) -> maps (B, H, W)``, batched: row i
explains ``targets[i]`` for ``images[i]``.
"""

from __future__ import annotations

from evaluation.attribution.bcos import bcos_explanation
from evaluation.attribution.common import AttributionMethod
from evaluation.attribution.grad_cam import grad_cam
from evaluation.attribution.guided_backprop import guided_backprop
from evaluation.attribution.intgrad import integrated_gradients
from evaluation.attribution.ixg import input_x_gradient
from evaluation.attribution.lime import lime
from evaluation.attribution.lrp import lrp
from evaluation.attribution.occlusion import occlusion
from evaluation.attribution.score_cam import score_cam
from probing.registry import Registry

__all__ = [
    "METHODS",
    "AttributionMethod",
    "bcos_explanation",
    "occlusion",
    "lrp",
    "lime",
    "score_cam",
    "create_method",
    "list_methods",
    "grad_cam",
    "guided_backprop",
    "input_x_gradient",
    "integrated_gradients",
]
ALL_LAYERS = ("input", "middle", "final")

METHODS: Registry[AttributionMethod] = Registry("attribution method")

NO_LRP_RULES = {
    "bcos": "zennit has no LRP rule for B-cos layers; use 'bcos' (their exact explanation) or a gradient method",
    "vit": "zennit has no LRP rule for attention and LayerNorm; use a gradient method",
}
for _method in (
    AttributionMethod("ixg", input_x_gradient, ALL_LAYERS, "Input x Gradient"),
    AttributionMethod("intgrad", integrated_gradients, ALL_LAYERS, "Integrated Gradients (zero baseline, 50 steps)"),
    AttributionMethod(
        "gbp", guided_backprop, ALL_LAYERS, "Guided Backprop",
        refuses=(("vit", "a vision transformer has no ReLU to guide (its GELUs pass plain gradients)"),),
    ),
    AttributionMethod("gradcam", grad_cam, ("middle", "final"), "Grad-CAM (ReLU before upsampling; relu=False drops it)"),
    AttributionMethod("bcos", bcos_explanation, ALL_LAYERS, "B-cos explanation (dynamic linear contributions)"),
    AttributionMethod(
        "lrp", lrp, ALL_LAYERS, "LRP, zennit EpsilonGammaBox with canonizers, from the target logit",
        refuses=tuple(NO_LRP_RULES.items()),
    ),
    AttributionMethod(
        "lime", lime, ("input",), "LIME (quickshift superpixels, 500 samples, segments hidden by their mean)",
        uses_probabilities=True,
    ),
    AttributionMethod("scorecam", score_cam, ("middle", "final"), "Score-CAM (Wang et al.'s weights)", uses_probabilities=True),
    AttributionMethod("occlusion", occlusion, ALL_LAYERS, "Occlusion (zero windows: 16/8 px, 5/2 at the final layer)"),
):
    METHODS.register(_method.name)(_method)


def create_method(name: str) -> AttributionMethod:
    return METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)
