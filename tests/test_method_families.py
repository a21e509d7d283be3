"""Every registered method on every registered backbone family (torchvision ResNet, VGG and ViT,
B-cos, embedded), at every layer it declares, or refused up front; LRP and Guided Backprop on the
unmodified torchvision ResNet against zennit's and captum's own results."""

import pytest
import torch
import torchvision
from torch import nn

from evaluation.attribution import create_method, list_methods
from evaluation.attribution.common import model_traits
from probing.backbones import BACKBONES, list_backbones
from probing.heads import create_head
from probing.model import ProbedModel
from probing.zoo import staged_backbone

CHEAP = {"intgrad": {"n_steps": 3}, "lime": {"num_samples": 8, "batch_size": 8}, "rise": {"n_masks": 32}}


def _small_vit():
    """A ViT small enough for the CPU, staged by the same code as the registered vit_b_16 (which
    needs 224 px inputs: its Score-CAM alone would take minutes here)."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    return staged_backbone("vit_small", vit)


# one entry per architecture (the self-supervised ResNet-50s share resnet50's)
FAMILIES = {
    "resnet18": lambda: BACKBONES.get("resnet18").build(),
    "resnet50": lambda: BACKBONES.get("resnet50").build(),
    "vgg11": lambda: BACKBONES.get("vgg11").build(),
    "vgg16": lambda: BACKBONES.get("vgg16").build(),
    "vit (small)": _small_vit,
    "bcos_resnet50": lambda: BACKBONES.get("bcos_resnet50").build(),
    "tiny_resnet": lambda: BACKBONES.get("tiny_resnet_sup").build(),
    "tiny_bcos_resnet": lambda: BACKBONES.get("tiny_bcos_resnet").build(),
    "tiny_vit": lambda: BACKBONES.get("tiny_vit_sup").build(),
    "clip_resnet50": lambda: BACKBONES.get("clip_resnet50").build(),
}


FULL_SIZE = {"resnet50", "vgg11", "vgg16", "bcos_resnet50", "clip_resnet50", "vit_b_16", "vit_b_16_dino", "vit_s_16_dino"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.full_size) if n in FULL_SIZE else n for n in names]


@pytest.mark.parametrize("family", _params(FAMILIES))
def test_every_method_runs_at_every_layer_it_declares_or_is_refused(family):
    torch.manual_seed(1)
    backbone = FAMILIES[family]().eval().requires_grad_(False)
    model = ProbedModel(backbone, create_head("linear", backbone.out_channels, 5)).eval()
    # one row: Score-CAM runs one forward per channel (2048 at ResNet-50's final layer); the shared
    # rows of several targets are tested on the small models (test_method_properties.py)
    x, targets = model.preprocess(torch.rand(1, 3, 32, 32)), torch.tensor([3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in list_methods():
        attribution = create_method(method)
        refusal = attribution.refusal(model_traits(model))
        for layer in attribution.layers:
            options = CHEAP.get(method, {}) | ({"probabilities": torch.sigmoid} if attribution.uses_probabilities else {})
            if refusal:
                with pytest.raises(ValueError, match=f"method '{method}' (does not apply|applies only)"):
                    attribution(model, x, targets, layer=layer, **options)
                continue
            maps = attribution(model, x, targets, layer=layer, **options)
            assert maps.shape == (1, 32, 32) and torch.isfinite(maps).all(), (family, method, layer)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", _params(list_backbones()))
def test_registered_traits_are_those_of_the_built_network(name):
    entry = BACKBONES.get(name)
    assert entry.traits == model_traits(entry.build())


def _torchvision_resnet18():
    torch.manual_seed(2)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # statistics as after training
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net.double()


def _probed(net):
    """The same network as a probed model: its stages, and its fc as a linear probe."""
    head = create_head("linear", 512, 10)
    with torch.no_grad():
        head.body.weight.copy_(net.fc.weight[:, :, None, None])
        head.body.bias.copy_(net.fc.bias)
    return ProbedModel(staged_backbone("resnet18", net), head).double().eval().requires_grad_(False)


def test_lrp_equals_zennit_on_the_unmodified_torchvision_resnet():
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox
    from zennit.torchvision import ResNetCanonizer

    net = _torchvision_resnet18()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    targets = torch.tensor([2, 5, 9])
    model = _probed(net)
    x = model.preprocess(images)
    ours = create_method("lrp")(model, x, targets, layer="input")
    low, high = model.preprocess(torch.zeros_like(images)), model.preprocess(torch.ones_like(images))
    expected = []
    for i, t in enumerate(targets.tolist()):  # per image, as the reference code: from the logit, zennit's own rules
        composite = EpsilonGammaBox(low=low[i : i + 1], high=high[i : i + 1], canonizers=[ResNetCanonizer()])
        with Gradient(net, composite) as attributor:
            one_hot = torch.eye(10, dtype=x.dtype)[[t]]
            _, relevance = attributor(x[i : i + 1].clone().requires_grad_(True), lambda out: out * one_hot)
        expected.append(relevance.sum(dim=1))
    expected = torch.cat(expected)
    logits = net(x)[torch.arange(3), targets]
    assert (logits < 0).any() and (logits > 0).any()  # both signs: starting from 1 would flip the negative ones
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-8 * float(expected.abs().max()))
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))  # torchvision's flags kept


def test_guided_backprop_runs_on_torchvisions_in_place_relus_and_equals_captum():
    from captum.attr import GuidedBackprop

    net = _torchvision_resnet18()
    model = _probed(net)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, targets = model.preprocess(images), torch.tensor([1, 7])
    ours = create_method("gbp")(model, x, targets, layer="input")
    reference = _torchvision_resnet18()  # the same weights, with out-of-place ReLUs for captum's hooks
    for module in reference.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    expected = torch.cat([
        GuidedBackprop(reference).attribute(x[i : i + 1], target=int(targets[i])).sum(dim=1) for i in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-10 * float(expected.abs().max()))
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
