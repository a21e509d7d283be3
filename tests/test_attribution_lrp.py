"""The speed-ups behind the batched gradient methods give the references' own results.

``CachedGamma`` (zennit's Gamma rule with its modified forward passes done once per forward pass)
against ``zennit.rules.Gamma`` on the cases the ResNets never reach (negative inputs, biases,
strides, groups, padding modes, 1-d convolutions); ``merged_batchnorm`` against the unmerged model.
"""

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon, Gamma, Pass

from evaluation.attribution.folding import conv_batchnorm_pairs, merged_batchnorm
from evaluation.attribution.guided_backprop import guided_backprop
from evaluation.attribution.lrp_gamma import CachedGamma
from probing.embedded_backbones import tiny_resnet
from probing.heads import create_head
from probing.model import ProbedModel


def _network(conv, dims: int) -> nn.Module:
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.Linear(conv.out_channels, 5)).double()


CONVS = {
    "2d, bias, stride 2, padding 1": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), 2),
    "2d, no bias, groups 2, dilation 2": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, bias=False), 2),
    "2d, reflect padding": (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), 2),
    "2d, padding 'same'": (lambda: nn.Conv2d(4, 8, 3, padding="same"), 2),
    "1d, bias": (lambda: nn.Conv1d(4, 8, 5, stride=2), 1),
}


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("signed", [True, False], ids=["signed inputs", "non-negative inputs"])
def test_cached_gamma_equals_zennit_gamma(case, signed):
    make, dims = CONVS[case]
    torch.manual_seed(0)
    net = _network(make(), dims).eval()
    with torch.no_grad():
        if net[0].bias is not None:
            net[0].bias.uniform_(-0.3, 0.3)  # both signs: b + gamma b+ and b + gamma b- differ
    shape = (6, 4, 17) if dims == 1 else (6, 4, 13, 11)
    x = torch.randn(*shape, dtype=torch.float64)
    x = x if signed else x.abs()
    targets = torch.eye(5, dtype=torch.float64)[[0, 1, 2, 3, 4, 0]]
    results = {}
    for name, rule in (("zennit", Gamma(gamma=0.25)), ("cached", CachedGamma(gamma=0.25))):
        composite = LayerMapComposite([(nn.ReLU, Pass()), (type(net[0]), rule), (nn.Linear, Epsilon())])
        with Gradient(net, composite) as attributor:
            _, results[name] = attributor(x.clone().requires_grad_(True), targets)
    assert results["zennit"].abs().max() > 0
    torch.testing.assert_close(results["cached"], results["zennit"], rtol=1e-10, atol=1e-14)
    assert not net[0]._forward_hooks  # removed with the composite


def test_cached_gamma_refuses_what_it_does_not_compute():
    with pytest.raises(TypeError, match="CachedGamma applies to Conv1d/2d/3d, not ConvTranspose2d"):
        CachedGamma().register(nn.ConvTranspose2d(2, 2, 3))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    backbone = tiny_resnet()
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    head = create_head("linear", backbone.out_channels, 10)
    return ProbedModel(backbone, head).double().eval().requires_grad_(False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merged_batchnorm_merges_every_pair_keeps_the_gradients_and_restores_the_model(model):
    before, parameters = _state(model), [id(p) for p in model.parameters()]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(model(x).sum(), x)[0]
    stages = model.backbone.stages
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stages.modules()) == 9
    with merged_batchnorm(model) as merged:
        assert merged is model and not any(isinstance(m, nn.BatchNorm2d) for m in stages.modules())
        assert type(stages[1]).__name__ == "BasicBlock" and isinstance(stages[1].relu1, nn.ReLU)  # structure kept
        folded = torch.autograd.grad(model(x).sum(), x)[0]
        with merged_batchnorm(model):  # nested: nothing left to merge
            assert not any(isinstance(m, nn.BatchNorm2d) for m in stages.modules())
    torch.testing.assert_close(folded, plain, rtol=1e-10, atol=1e-12)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stages.modules()) == 9
    assert [id(p) for p in model.parameters()] == parameters
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_merged_batchnorm_restores_the_model_after_an_error(model):
    before = _state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_batchnorm(model):
            raise RuntimeError("inside")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.stages.modules()) == 9


def test_merged_batchnorm_keeps_a_batchnorm_whose_conv_output_is_used_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # merging bn into conv would change the second use

    assert conv_batchnorm_pairs(Twice().eval()) == []


def test_guided_backprop_differs_from_the_plain_gradient(model):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    guided = guided_backprop(model, x, targets)
    plain = torch.autograd.grad(model(x.requires_grad_(True))[[0, 1], targets].sum(), x)[0].sum(dim=1)
    assert not torch.allclose(guided, plain, rtol=1e-3)
