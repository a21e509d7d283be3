"""Batched attribution maps equal captum's own per-image, per-target results (REFERENCE section 4)."""

import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    LayerGradientXActivation,
    Occlusion,
    Saliency,
)
from torch import nn

from evaluation.attribution import create_method
from probing.embedded_backbones import tiny_resnet
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
    options = {"relu": False} if method == "gradcam" else {}  # captum's default keeps negative evidence
    ours = create_method(method)(model, x, targets, layer=layer, **options)
    captum = CAPTUM_AT_LAYER[method](model, model.backbone.stages[LAYER_MODULE[layer]])
    expected = _per_image(lambda xi, t: _upsampled(captum.attribute(xi, target=t), (32, 32)), x, targets)
    if method == "gradcam":
        assert (ours < 0).any(), "without the final ReLU negative evidence stays in the map"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("layer", ["input", "middle", "final"])
def test_gradient_equals_captums_saliency(model, inputs, layer, absolute):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("grad")(model, x, targets, layer=layer, abs=absolute)
    if layer == "input":
        captum = Saliency(model)
        expected = _per_image(lambda xi, t: captum.attribute(xi, target=t, abs=absolute).sum(dim=1), x, targets)
    else:  # the gradient at a layer: captum's layer attribution without the activation factor
        captum = LayerGradientXActivation(model, model.backbone.stages[LAYER_MODULE[layer]], multiply_by_inputs=False)
        gradient = (lambda g: g.abs()) if absolute else (lambda g: g)
        expected = _per_image(lambda xi, t: _upsampled(gradient(captum.attribute(xi, target=t)), (32, 32)), x, targets)
    assert (ours < 0).any() != absolute  # signed unless abs
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("method, reference", [("gradcampp", "GradCAMPlusPlus"), ("layercam", "LayerCAM")])
@pytest.mark.parametrize("layer", ["middle", "final"])
def test_cam_variants_equal_the_grad_cam_package_per_image(model, inputs, method, reference, layer):
    """The package's own hooks and its ``get_cam_image`` per image and target, then its ReLU; its
    min-max normalisation and OpenCV resizing are left out (we keep maps unnormalised and
    upsample as every method here)."""
    import pytorch_grad_cam

    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method(method)(model, x, targets, layer=layer)
    module = model.backbone.stages[LAYER_MODULE[layer]]
    cam = getattr(pytorch_grad_cam, reference)(model, [module])

    def package(xi, t):
        recorded = cam.activations_and_grads
        recorded(xi.clone().requires_grad_(True))[0, t].backward()
        activation, gradient = recorded.activations[0].numpy(), recorded.gradients[0].numpy()
        raw = cam.get_cam_image(xi, module, None, activation, gradient, False)
        return _upsampled(torch.from_numpy(raw).clamp(min=0)[:, None], (32, 32))

    try:
        expected = _per_image(package, x, targets)
    finally:
        cam.activations_and_grads.release()
    assert (ours > 0).any() and (ours >= 0).all()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("layer", ["middle", "final"])
def test_ablation_cam_equals_the_grad_cam_package_per_image(model, inputs, layer):
    """The package's own weights (it ablates by swapping the layer for its AblationLayer) per
    image and target, then its weighted sum and ReLU; it keeps scores in float32."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("ablationcam")(model, x, targets, layer=layer, internal_batch_size=48)  # channels in chunks
    module = model.backbone.stages[LAYER_MODULE[layer]]
    cam = AblationCAM(model, [module])

    def package(xi, t):
        activation = model.forward_to(xi, layer).numpy()
        raw = cam.get_cam_image(xi, module, [ClassifierOutputTarget(t)], activation, None, False)
        return _upsampled(torch.from_numpy(raw).clamp(min=0)[:, None], (32, 32))

    try:
        expected = _per_image(package, x, targets)
    finally:
        cam.activations_and_grads.release()
    assert module is model.backbone.stages[LAYER_MODULE[layer]]  # the package put the layer back
    assert (ours > 0).any()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_rise_equals_its_formula_per_image_and_mask(model, inputs):
    from evaluation.attribution import rise_masks

    images, targets = inputs
    x = model.preprocess(images)
    softmax = lambda z: z.softmax(dim=1)  # noqa: E731
    ours = create_method("rise")(model, x, targets, layer="input", probabilities=softmax, n_masks=40, cells=4, seed=3, internal_batch_size=64)
    masks = rise_masks(40, (32, 32), cells=4, seed=3, dtype=torch.float64)
    assert torch.equal(rise_masks(8, (32, 32), cells=4, seed=3, first=30, dtype=torch.float64), masks[30:38])  # fixed blocks

    def formula(xi, t):
        total = sum(softmax(model(xi * masks[i]))[0, t] * masks[i, 0] for i in range(40))
        return (total / (40 * 0.5))[None]

    torch.testing.assert_close(ours, _per_image(formula, x, targets), rtol=1e-7, atol=1e-12)


class CornerModel(nn.Module):
    """Class 0's score is the mean of the image's top-left 4 x 4 pixels, class 1's of its bottom-right ones."""

    def forward(self, x):
        return torch.stack([x[..., :4, :4].mean(dim=(1, 2, 3)), x[..., -4:, -4:].mean(dim=(1, 2, 3))], dim=1)


def test_rise_puts_a_class_where_its_evidence_is():
    """Known answer: with the score linear in the mask, E[map(u)] = E[score(M) M(u)] / p, about 1 /
    p = 2 times larger where the mask decides the score than far from it (less, as upsampled masks
    are not 0 or 1: 1.4-1.5 times measured)."""
    images = torch.ones(2, 1, 32, 32, dtype=torch.float64)
    maps = create_method("rise")(CornerModel(), images, torch.tensor([0, 1]), probabilities=lambda z: z, n_masks=800)
    top_left, bottom_right = maps[:, :4, :4].mean(dim=(1, 2)), maps[:, -4:, -4:].mean(dim=(1, 2))
    assert top_left[0] > 1.25 * bottom_right[0] and bottom_right[1] > 1.25 * top_left[1]


class FromLayer(nn.Module):
    """The model from a layer's activation to the logits: captum's plain call treats it as the input."""

    def __init__(self, model, layer):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, activation):
        return self.model.forward_from(activation, self.layer)


@pytest.mark.parametrize("layer", ["input", "middle", "final"])
def test_integrated_gradients_equal_captum(model, inputs, layer):
    images, targets = inputs
    x = model.preprocess(images)
    # a small internal batch: the steps run in several chunks and must add up to captum's result
    ours = create_method("intgrad")(model, x, targets, layer=layer, n_steps=20, internal_batch_size=12)
    activation = model.forward_to(x, layer)
    captum = IntegratedGradients(FromLayer(model, layer))
    expected = _per_image(
        lambda ai, t: _upsampled(captum.attribute(ai, target=t, n_steps=20, method="gausslegendre"), (32, 32)),
        activation,
        targets,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)


def test_integrated_gradients_complete_to_the_logit_difference(model, inputs):
    images, targets = inputs
    x = model.preprocess(images)
    maps = create_method("intgrad")(model, x, targets, layer="input", n_steps=200)
    logits, baseline = model(x), model(torch.zeros_like(x))
    rows = torch.arange(len(targets))
    difference = logits[rows, targets] - baseline[rows, targets]
    torch.testing.assert_close(maps.sum(dim=(1, 2)), difference, rtol=1e-3, atol=1e-3 * float(difference.abs().max()))


@pytest.mark.parametrize("layer", ["input", "middle", "final"])
def test_guided_backprop_equals_captum(model, inputs, layer):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("gbp")(model, x, targets, layer=layer)
    activation = model.forward_to(x, layer)
    captum = GuidedBackprop(FromLayer(model, layer))
    expected = _per_image(lambda ai, t: _upsampled(captum.attribute(ai, target=t), (32, 32)), activation, targets)
    # guided maps differ from plain gradients: the hooks did something
    assert not torch.allclose(ours, _upsampled(_plain_gradient(model, x, targets, layer), (32, 32)))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)
    assert not any(m._backward_hooks for m in model.modules())  # hooks removed afterwards


def _plain_gradient(model, x, targets, layer):
    from evaluation.attribution.common import target_gradients

    return target_gradients(model, x, targets, layer)[1]


@pytest.mark.parametrize("layer", ["middle", "final"])
def test_gradcam_applies_its_relu_before_upsampling_by_default(model, inputs, layer):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("gradcam")(model, x, targets, layer=layer)  # Rao et al.: ReLU, then upsampling
    captum = LayerGradCam(model, model.backbone.stages[LAYER_MODULE[layer]])
    expected = _per_image(  # captum's ReLU acts on the layer's map; upsampling comes after
        lambda xi, t: _upsampled(captum.attribute(xi, target=t, relu_attributions=True), (32, 32)), x, targets
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-12)
    clamped_after = create_method("gradcam")(model, x, targets, layer=layer, relu=False).clamp(min=0)
    assert not torch.allclose(ours, clamped_after)  # the order matters where bilinear blends signs


def test_method_refuses_a_layer_where_it_is_undefined(model, inputs):
    images, targets = inputs
    with pytest.raises(ValueError, match="'gradcam' is not defined at layer 'input': use one of middle, final"):
        create_method("gradcam")(model, images, targets, layer="input")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown attribution method 'ixgg': known are ablationcam, attention_grad, attnlrp, bcos, cgw1, gbp, grad, gradcam, gradcampp, intgrad, ixg, layercam, lime, lrp, occlusion, rise, rollout, scorecam, vitcx; did you mean 'ixg'"):
        create_method("ixgg")


def test_targets_must_match_batch(model, inputs):
    images, _ = inputs
    with pytest.raises(ValueError, match="targets must be an int64 tensor of shape \\(5,\\)"):
        create_method("ixg")(model, images, torch.tensor([0, 1]), layer="input")


@pytest.mark.parametrize("layer, window, stride", [("input", 8, 4), ("middle", 4, 2), ("final", 3, 1)])
def test_occlusion_equals_captum(model, inputs, layer, window, stride):
    images, targets = inputs
    x = model.preprocess(images)
    # a small internal batch: the windows run in several chunks
    ours = create_method("occlusion")(model, x, targets, layer=layer, window=window, stride=stride, internal_batch_size=7)
    activation = model.forward_to(x, layer)
    captum = Occlusion(FromLayer(model, layer))
    channels = activation.shape[1]
    expected = _per_image(
        lambda ai, t: _upsampled(
            captum.attribute(ai, target=t, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride))
            / channels,  # captum gives every channel the window's drop; we keep one value per position
            (32, 32),
        ),
        activation,
        targets,
    )
    # captum accumulates occlusion in float32 even for a float64 model
    torch.testing.assert_close(ours, expected.double(), rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_bcos_explanation_sums_to_the_logit_and_is_ixg_without_bcos_modules(model, inputs):
    from probing.embedded_backbones import tiny_bcos_resnet

    images, targets = inputs
    x = model.preprocess(images)
    torch.testing.assert_close(create_method("bcos")(model, x, targets), create_method("ixg")(model, x, targets))
    torch.manual_seed(0)
    backbone = tiny_bcos_resnet()
    bcos_model = ProbedModel(backbone, create_head("bcos", 64, 10, depth=2, width=16, logit_bias=-1.0)).double().eval()
    x = bcos_model.preprocess(images)
    logits = bcos_model(x)[torch.arange(5), targets]
    for layer in ("input", "middle", "final"):
        maps = create_method("bcos")(bcos_model, x, targets, layer=layer)
        if layer == "input":  # no upsampling there: the map sums exactly to the logit minus its bias
            torch.testing.assert_close(maps.sum(dim=(1, 2)), logits + 1.0, rtol=1e-7, atol=1e-9)
        assert maps.shape == (5, 32, 32)
    assert not any(getattr(m, "detach", False) for m in bcos_model.modules())  # explanation mode left


@pytest.mark.parametrize("layer", ["input", "middle", "final"])
def test_lrp_equals_zennit_per_image(model, inputs, layer):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, Gamma
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    from evaluation.attribution.lrp import BasicBlockCanonizer
    from probing.heads import Pointwise

    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("lrp")(model, x, targets, layer=layer)
    activation = model.forward_to(x, layer)

    def zennit_plain(ai, t):  # zennit's own rules, as the reference code composes them
        canonizers = [ResNetCanonizer(), BasicBlockCanonizer()]
        bounds = (model.preprocess(torch.zeros_like(images[:1])), model.preprocess(torch.ones_like(images[:1])))
        pointwise = [(Pointwise, Epsilon())]  # the probe's fully connected layers
        rules = pointwise + layer_map_base() + [(Convolution, Gamma(gamma=0.25)), (nn.Linear, Epsilon())]
        composite = (
            EpsilonGammaBox(*bounds, canonizers=canonizers, layer_map=pointwise)
            if layer == "input"
            else LayerMapComposite(layer_map=rules, canonizers=canonizers)
        )
        with Gradient(FromLayer(model, layer), composite) as attributor:
            one_hot = torch.eye(10, dtype=ai.dtype)[[t]]
            _, relevance = attributor(ai.clone().requires_grad_(True), lambda out: out * one_hot)  # from the logit
        return _upsampled(relevance, (32, 32))

    expected = _per_image(zennit_plain, activation, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-10)
    # the rules did something: LRP is not Input x Gradient here, and relevance is conserved roughly
    assert not torch.allclose(ours, create_method("ixg")(model, x, targets, layer=layer), rtol=1e-2)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # hooks removed afterwards


def test_lrp_canonizes_the_residual_sums_of_the_embedded_resnet(model, inputs):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    images, targets = inputs
    x = model.preprocess(images)
    bounds = (model.preprocess(torch.zeros_like(images)), model.preprocess(torch.ones_like(images)))
    with Gradient(model, EpsilonGammaBox(*bounds)) as attributor:  # no canonizers: plain gradient through "+"
        _, uncanonized = attributor(x.clone().requires_grad_(True), torch.eye(10, dtype=x.dtype)[targets])
    ours = create_method("lrp")(model, x, targets, layer="input")
    assert not torch.allclose(ours, uncanonized.sum(dim=1), rtol=1e-2)


def score_cam_reference(model, activation, xi, t, probabilities):
    """Wang et al.'s Score-CAM for one image and target, channel by channel: each channel's weight is
    the target's probability for the input masked by its upsampled, min-max scaled map."""
    size = xi.shape[-2:]
    weights = []
    for k in range(activation.shape[1]):
        upsampled = torch.nn.functional.interpolate(activation[:, k : k + 1], size=size, mode="bilinear", align_corners=True)
        mask = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min() + 1e-8)
        if model.bcos_input:  # mask the image x and encode it again
            masked = torch.cat([xi[:, :3] * mask, 1 - xi[:, :3] * mask], dim=1)
        else:
            masked = xi * mask
        weights.append(probabilities(model(masked))[0, t])
    cam = (torch.stack(weights)[None, :, None, None] * activation).sum(dim=1, keepdim=True).clamp(min=0)
    return _upsampled(cam, size)


@pytest.mark.parametrize("layer", ["middle", "final"])
def test_score_cam_equals_the_papers_formula_per_image(model, inputs, layer):
    images, targets = inputs
    x = model.preprocess(images)
    ours = create_method("scorecam")(model, x, targets, layer=layer, internal_batch_size=40)  # 1-2 rows per pass
    activation = model.forward_to(x, layer)

    def reference(xi, t):
        row = int((x == xi).all(dim=(1, 2, 3)).nonzero()[0])
        return score_cam_reference(model, activation[[row]], xi, t, lambda z: z.softmax(dim=1))

    expected = _per_image(reference, x, targets)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("internal_batch_size", [24, 256])
def test_score_cam_weighs_constant_channels_with_one_input_and_keeps_to_its_batch_size(model, inputs, internal_batch_size):
    """A constant channel's mask is 0 everywhere: its weight is the probability of the fully
    masked input, one per row for all of them (a dead ReLU channel, a constant one, a row whose
    every channel is constant, as at 1x1 maps); no forward pass takes more inputs than asked."""
    images, targets = inputs
    x = model.preprocess(images)
    activation = model.forward_to(x, "final").clone()
    activation[:, 0] = 0.0  # dead
    activation[:, 1] = 0.7  # constant, not 0
    activation[2] = activation[2].mean(dim=(1, 2), keepdim=True)  # every channel of row 2
    sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    try:
        ours = create_method("scorecam")(model, x, targets, layer="final", activation=activation, internal_batch_size=internal_batch_size)
    finally:
        hook.remove()
    expected = torch.cat([
        score_cam_reference(model, activation[[i]], x[i : i + 1], int(targets[i]), lambda z: z.softmax(dim=1)) for i in range(5)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)
    assert expected[2].abs().max() > 0  # the constant channels weigh in
    channels = activation.shape[1]
    per_pass = max(1, internal_batch_size // channels)
    varying = [(activation[i].flatten(1).amax(1) > activation[i].flatten(1).amin(1)) for i in range(5)]
    passes = [range(s, min(s + per_pass, 5)) for s in range(0, 5, per_pass)]
    expected_inputs = sum(len(p) * (1 + int(sum(torch.stack([varying[i] for i in p]).any(0)))) for p in passes)
    assert sum(sizes) == expected_inputs < 5 * channels and max(sizes) <= internal_batch_size


def test_lime_shares_samples_across_the_targets_of_one_image_and_equals_plain_lime(model, inputs):
    import numpy as np
    from lime.lime_image import LimeImageExplainer

    from evaluation.attribution.lime import _as_rgb, _segmenter

    images, _ = inputs
    # quadrants of distinct colours under the noise, so that quickshift finds several superpixels
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9], [0.9, 0.9, 0.1]], dtype=images.dtype)
    blocks = colours.T.reshape(3, 2, 2).repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    structured = (0.8 * blocks + 0.2 * images[:2]).clamp(0, 1)
    x = model.preprocess(structured).repeat_interleave(2, dim=0)  # two images, two targets each
    targets = torch.tensor([1, 7, 0, 3])
    ours = create_method("lime")(model, x, targets, layer="input", num_samples=60, batch_size=25)

    def plain(xi, t):
        picture = xi[0].permute(1, 2, 0).numpy()

        def classify(batch):
            with torch.no_grad():
                return model(torch.from_numpy(batch).permute(0, 3, 1, 2)).softmax(dim=1).numpy()

        explanation = LimeImageExplainer(random_state=0).explain_instance(
            picture, classify, labels=[t], top_labels=None, hide_color=None, num_samples=60, batch_size=25,
            segmentation_fn=lambda _: _segmenter()(_as_rgb(xi[0])), random_seed=0,
        )  # fmt: skip
        segments = _segmenter()(_as_rgb(xi[0]))
        weights = dict(explanation.local_exp[t])
        return torch.from_numpy(np.vectorize(lambda s: weights.get(s, 0.0))(segments))[None]

    expected = _per_image(plain, x, targets)
    assert len(torch.unique(ours[0])) > 2  # several superpixels with their own weights
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method, layer", [("ixg", "input"), ("gbp", "middle"), ("gradcam", "final"), ("intgrad", "input"),
                                           ("lrp", "input"), ("lrp", "middle"), ("bcos", "final"), ("grad", "input"),
                                           ("gradcampp", "final"), ("layercam", "middle"), ("ablationcam", "final"),
                                           ("rise", "input")])  # fmt: skip
def test_targets_of_one_image_share_its_forward_and_equal_one_row_at_a_time(model, inputs, method, layer):
    from evaluation.attribution.common import repeated_rows

    images, _ = inputs
    x = model.preprocess(images[:2]).repeat_interleave(3, dim=0)  # as the grid evaluation lays out targets
    targets = torch.tensor([1, 4, 7, 0, 2, 9])
    assert repeated_rows(x) == 3 and repeated_rows(model.preprocess(images)) == 1
    options = {"intgrad": {"n_steps": 8, "internal_batch_size": 4}, "rise": {"n_masks": 48}}.get(method, {})  # in chunks too
    shared = create_method(method)(model, x, targets, layer=layer, **options)
    alone = torch.cat([create_method(method)(model, x[i : i + 1], targets[i : i + 1], layer=layer, **options) for i in range(6)])
    torch.testing.assert_close(shared, alone, rtol=1e-7, atol=1e-12)


@pytest.fixture(scope="module")
def bcos_model():
    from probing.embedded_backbones import tiny_bcos_resnet

    torch.manual_seed(0)
    backbone = tiny_bcos_resnet()
    return ProbedModel(backbone, create_head("linear", 64, 10)).double().eval().requires_grad_(False)


def test_score_cam_on_a_bcos_model_masks_the_image_and_encodes_it_again(bcos_model, inputs):
    images, targets = inputs
    x = bcos_model.preprocess(images[:2])
    ours = create_method("scorecam")(bcos_model, x, targets[:2], layer="final")
    activation = bcos_model.forward_to(x, "final")
    expected = torch.cat([
        score_cam_reference(bcos_model, activation[[i]], x[i : i + 1], int(targets[i]), lambda z: z.softmax(dim=1))
        for i in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)


def test_occlusion_at_the_input_of_a_bcos_model_occludes_the_image_and_encodes_it_again(bcos_model, inputs):
    images, targets = inputs
    x = bcos_model.preprocess(images[:1])
    ours = create_method("occlusion")(bcos_model, x, targets[:1], layer="input", window=32, stride=32)  # one window: all
    blank = bcos_model.preprocess(torch.zeros_like(images[:1]))  # x = 0 everywhere: [0, 1], not all zeros
    assert torch.equal(blank[:, 3:], torch.ones_like(blank[:, 3:]))
    logit = lambda inputs: bcos_model(inputs)[0, int(targets[0])]  # noqa: E731
    torch.testing.assert_close(ours, (logit(x) - logit(blank)).expand(1, 32, 32), rtol=1e-9, atol=1e-12)


def test_lrp_canonizes_the_residual_sums_of_clips_bottlenecks():
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    from probing.backbones import BACKBONES
    from probing.clip_resnet import ClipBottleneck

    torch.manual_seed(0)
    backbone = BACKBONES.get("clip_resnet50").build().eval()
    model = ProbedModel(backbone, create_head("linear", backbone.out_channels, 10)).double().eval().requires_grad_(False)
    images, targets = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    x = model.preprocess(images)
    plain = model(x)
    ours = create_method("lrp")(model, x, targets, layer="input")
    bounds = (model.preprocess(torch.zeros_like(images)), model.preprocess(torch.ones_like(images)))
    with Gradient(model, EpsilonGammaBox(*bounds)) as attributor:  # no canonizers: plain gradient through "+"
        _, uncanonized = attributor(x.clone().requires_grad_(True), torch.eye(10, dtype=x.dtype)[targets])
    # canonized, relevance is conserved through the 16 residual sums (the logit, up to the bias
    # terms' share); a plain gradient through "+" passes the whole relevance to both branches
    logits = plain[torch.arange(2), targets]
    torch.testing.assert_close(ours.sum(dim=(1, 2)), logits, rtol=0.05, atol=0.0)
    assert (uncanonized.sum(dim=(1, 2, 3)).abs() > 10 * logits.abs()).all()
    torch.testing.assert_close(model(x), plain)  # the canonized forward was the same network, and is gone
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, ClipBottleneck))
