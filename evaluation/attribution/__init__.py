"""Attribution methods: one registry, one call shape.

``create_method(name)(model, images, targets, layer=...) -> maps (B, H, W)``, batched: row i
explains ``targets[i]`` for ``images[i]``.
"""

from __future__ import annotations

from evaluation.attribution.common import AttributionMethod
from evaluation.attribution.grad_cam import grad_cam
from evaluation.attribution.ixg import input_x_gradient
from probing.registry import Registry

__all__ = ["METHODS", "AttributionMethod", "create_method", "list_methods", "grad_cam", "input_x_gradient"]

METHODS: Registry[AttributionMethod] = Registry("attribution method")

METHODS.register("ixg")(
    AttributionMethod("ixg", input_x_gradient, ("input", "middle", "final"), "Input x Gradient")
)
METHODS.register("gradcam")(AttributionMethod("gradcam", grad_cam, ("middle", "final"), "Grad-CAM (no ReLU)"))


def create_method(name: str) -> AttributionMethod:
    return METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)
