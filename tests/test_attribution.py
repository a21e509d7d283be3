"""Batched attribution maps equal captum's own per-image, per-target results (REFERENCE section 4)."""

import pytest
import torch
from captum.attr import InputXGradient, LayerAttribution, LayerGradCam, LayerGradientXActivation

from evaluation.attribution import create_method
from probing.backbones import tiny_resnet
from probing.heads import create_head
from probing.model import ProbedModel

# ML-Att layers of tiny_resnet as modules: the activation at a layer is the output of the stage before it.
LAYER_MODULE = {"middle": 2, "final": 3}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = tiny_resnet()
    for module in backbone.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    head = create_head("mlp", backbone.out_channels, 10, depth=2, width=32, logit_bias=-2.0)
    return ProbedModel(backbone, head).double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 32, 32, generator=generator, dtype=torch.float64)
    return images, torch.tensor([0, 3, 3, 9, 5])


def _per_image(reference, images, targets):
    return torch.cat([reference(images[i : i + 1], int(targets[i])) for i in range(len(images))])


def _upsampled(layer_maps, size):
    return LayerAttribution.interpolate(layer_maps.sum(dim=1, keepdim=True), size, "bilinear")[:, 0]


def test_ixg_at_input_equals_captum(model, inputs):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("ixg")(model, x, targets, layer="input")
    captum = InputXGradient(model)
    expected = _per_image(lambda xi, t: captum.attribute(xi, target=t).sum(dim=1), x, targets)
    assert ours.shape == (5, 32, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


CAPTUM_AT_LAYER = {"ixg": LayerGradientXActivation, "gradcam": LayerGradCam}


@pytest.mark.parametrize("method", ["ixg", "gradcam"])
@pytest.mark.parametrize("layer", ["middle", "final"])
def test_inner_layer_maps_equal_captum(model, inputs, method, layer):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method(method)(model, x, targets, layer=layer)
    captum = CAPTUM_AT_LAYER[method](model, model.backbone.stages[LAYER_MODULE[layer]])
    expected = _per_image(lambda xi, t: _upsampled(captum.attribute(xi, target=t), (32, 32)), x, targets)
    if method == "gradcam":
        assert (ours < 0).any(), "without the final ReLU negative evidence stays in the map"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


def test_gradcam_relu_equals_captum_relu(model, inputs):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("gradcam")(model, x, targets, layer="final", relu=True)
    captum = LayerGradCam(model, model.backbone.stages[3])
    expected = _per_image(
        lambda xi, t: _upsampled(captum.attribute(xi, target=t, relu_attributions=True), (32, 32)), x, targets
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


def test_method_refuses_a_layer_where_it_is_undefined(model, inputs):
    images, targets = inputs
    with pytest.raises(ValueError, match="'gradcam' is not defined at layer 'input': use one of middle, final"):
        create_method("gradcam")(model, images, targets, layer="input")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribution method 'ixgg': known are gradcam, ixg; did you mean 'ixg'"):
        create_method("ixgg")


def test_targets_must_match_batch(model, inputs):
    images, _ = inputs
    with pytest.raises(ValueError, match="targets must be an int64 tensor of shape \\(5,\\)"):
        create_method("ixg")(model, images, torch.tensor([0, 1]), layer="input")
